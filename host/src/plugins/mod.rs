//! WebAssembly plugins: the authorizer, bundler and placement components a node loads from its
//! config, and how they are called.
//!
//! - [`bindings`] is the one place `bindgen!` runs; [`runtime`] owns the engine, compilation and
//!   the data of each store; [`builtin`] the components embedded in the binary; [`polar`] the
//!   host's Polar policy.
//! - A [`Plugin`] keeps its component's `InstancePre` and a small pool of configured instances.
//!   Every call runs under a deadline and a memory cap. A trap, a timeout or an out-of-memory
//!   becomes a [`PluginError`] naming the plugin (with the last line it printed to stderr, a
//!   panic message for instance); the instance that failed is dropped (a trapped instance cannot
//!   be entered again) and the next call gets a fresh one. What a plugin prints is logged by
//!   [`output`], rate-limited, never on the node's own stderr.
//! - Calls block: make them on the blocking pool, never on an async runtime's thread (see
//!   [`runtime`]).
//! - [`Plugins`] holds the current [`PluginSet`] and swaps it atomically on reload; calls that
//!   started on the old set finish on it.
//!
//! The engine speaks only the WIT types ([`types`]): what an action, a decision or a member means
//! to the node is the business of `access` and `placement`, which convert.

pub mod bindings;
pub mod builtin;
pub mod output;
pub mod polar;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use wasmtime::Store;
use wasmtime::component::{Component, Resource};

pub use bindings::{Buffer, PACKAGE_VERSION, bundles, types};
use polar::Polar;
use runtime::StoreState;

/// Instances kept ready per plugin between calls.
const MAX_IDLE_INSTANCES: usize = 8;

/// A plugin failure. Load errors name the config key; call errors name the plugin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    /// The plugin could not be loaded.
    #[error("config key `{key}`: plugin {plugin}: {message}")]
    Load {
        /// The config key that names it.
        key: String,
        /// Its source.
        plugin: String,
        /// Why.
        message: String,
    },
    /// A call passed its deadline.
    #[error("plugin {plugin} ran out of time ({timeout:?}{})", on_cpu_note(on_cpu))]
    Timeout {
        /// The plugin.
        plugin: Arc<str>,
        /// Its deadline.
        timeout: Duration,
        /// How long its thread ran on a CPU meanwhile (from the call's first tick, within a
        /// tick of its start), when measured: far less than `timeout`
        /// says the thread waited (a machine short of CPU, a page fault, a lock), not that the
        /// plugin computed for long.
        on_cpu: Option<Duration>,
    },
    /// A call passed its memory limit.
    #[error("plugin {plugin} exceeded its memory limit ({limit_mib} MiB)")]
    OutOfMemory {
        /// The plugin.
        plugin: Arc<str>,
        /// Its limit.
        limit_mib: u64,
    },
    /// A call trapped (a panic, an out-of-bounds access…).
    #[error("plugin {plugin} trapped: {message}")]
    Trap {
        /// The plugin.
        plugin: Arc<str>,
        /// The trap, with the plugin's last words on stderr.
        message: String,
    },
    /// An instance could not be made or configured.
    #[error("plugin {plugin} could not be instantiated: {message}")]
    Instantiate {
        /// The plugin.
        plugin: Arc<str>,
        /// Why.
        message: String,
    },
}

/// How a timeout's message tells a slow plugin from a thread that waited.
fn on_cpu_note(on_cpu: &Option<Duration>) -> String {
    match on_cpu {
        Some(on_cpu) => format!(", {on_cpu:.1?} of it on a CPU"),
        None => String::new(),
    }
}

/// The `[plugins]` section of the configuration: the WebAssembly plugins of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsSection {
    /// Compiled components are cached here (default: `<data_dir>/plugin-cache`).
    pub cache_dir: Option<PathBuf>,
    /// The Polar policy behind the host `polar` interface (default: the built-in
    /// `policies/default.polar`).
    pub policy_file: Option<PathBuf>,
    /// How long an authorization decision is reused, per subject, action and point (0: never).
    pub decision_cache_ms: u64,
    /// `[plugins.authorizer]`.
    pub authorizer: PluginSection,
    /// `[plugins.bundler]`.
    pub bundler: PluginSection,
    /// `[plugins.placement]`.
    pub placement: PluginSection,
}

/// One plugin: its component, its own configuration and its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginSection {
    /// `builtin:NAME`, or the path of a `.wasm` component.
    pub source: String,
    /// Configuration text handed to the plugin's `configure` (or use `config_file`).
    pub config: String,
    /// A file whose text is handed to `configure` instead of `config`.
    pub config_file: Option<PathBuf>,
    /// Deadline of one call.
    pub timeout_ms: u64,
    /// Cap of the plugin's linear memory.
    pub max_memory_mib: u64,
}

impl PluginSection {
    fn builtin(name: &str, timeout_ms: u64) -> Self {
        Self {
            source: format!("builtin:{name}"),
            config: String::new(),
            config_file: None,
            timeout_ms,
            max_memory_mib: 64,
        }
    }
}

impl Default for PluginSection {
    fn default() -> Self {
        Self::builtin("polar-authorizer", 100)
    }
}

impl Default for PluginsSection {
    fn default() -> Self {
        Self {
            cache_dir: None,
            policy_file: None,
            decision_cache_ms: 5_000,
            authorizer: PluginSection::builtin("polar-authorizer", 100),
            bundler: PluginSection::builtin("crc-bundler", 1_000),
            placement: PluginSection::builtin("ring-placement", 100),
        }
    }
}

impl PluginsSection {
    /// Checks what serde cannot; errors name the key (`plugins.<kind>`).
    pub fn validate(&self) -> Result<(), PluginError> {
        let max = (runtime::MAX_MEMORY_BYTES >> 20) as u64;
        for (kind, section) in [
            ("authorizer", &self.authorizer),
            ("bundler", &self.bundler),
            ("placement", &self.placement),
        ] {
            let invalid = |message: &str| PluginError::Load {
                key: format!("plugins.{kind}"),
                plugin: section.source.clone(),
                message: message.into(),
            };
            if section.source.is_empty() {
                return Err(invalid("source must name `builtin:NAME` or a .wasm file"));
            }
            if section.timeout_ms == 0 {
                return Err(invalid("timeout_ms must be at least 1"));
            }
            if !(1..=max).contains(&section.max_memory_mib) {
                return Err(invalid(&format!("max_memory_mib must be within 1..={max}")));
            }
            if !section.config.is_empty() && section.config_file.is_some() {
                return Err(invalid("set either config or config_file, not both"));
            }
        }
        Ok(())
    }
}

/// A world a plugin component implements: how to prepare, instantiate and configure it.
pub trait Kind: Send + Sync + 'static {
    /// `authorizer`, `bundler` or `placement`: the config section and metric label.
    const NAME: &'static str;
    /// The generated bindings of an instance.
    type Bindings: Send + 'static;
    /// The generated pre-instantiated component.
    type Pre: Clone + Send + Sync + 'static;

    /// Checks that `component` implements this world and links its imports.
    fn prepare(component: &Component) -> wasmtime::Result<Self::Pre>;
    /// An instance of `pre` in `store`.
    fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<StoreState>,
    ) -> wasmtime::Result<Self::Bindings>;
    /// Hands `config` to the instance's `configure`.
    fn configure(
        bindings: &Self::Bindings,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>>;
}

/// The three worlds differ only in their generated types.
macro_rules! kind {
    ($kind:ident, $name:literal, $module:ident, $world:ident, $pre:ident, $link:path) => {
        #[doc = concat!("The `", $name, "` world.")]
        pub struct $kind;

        impl Kind for $kind {
            const NAME: &'static str = $name;
            type Bindings = bindings::$module::$world;
            type Pre = bindings::$module::$pre<StoreState>;

            fn prepare(component: &Component) -> wasmtime::Result<Self::Pre> {
                let linker = runtime::linker($link)?;
                Self::Pre::new(linker.instantiate_pre(component)?)
            }

            fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<StoreState>,
            ) -> wasmtime::Result<Self::Bindings> {
                pre.instantiate(store)
            }

            fn configure(
                bindings: &Self::Bindings,
                store: &mut Store<StoreState>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                bindings.call_configure(store, config)
            }
        }
    };
}

kind!(
    AuthorizerKind,
    "authorizer",
    authorizer,
    Authorizer,
    AuthorizerPre,
    bindings::link_authorizer
);
kind!(
    BundlerKind,
    "bundler",
    bundler,
    Bundler,
    BundlerPre,
    bindings::link_bundler
);
kind!(
    PlacementKind,
    "placement",
    placement,
    Placement,
    PlacementPre,
    bindings::link_placement
);

/// A loaded plugin: its prepared component, its configuration and its idle instances.
pub struct Plugin<K: Kind> {
    name: Arc<str>,
    pre: K::Pre,
    config: String,
    timeout: Duration,
    max_memory_mib: u64,
    polar: Option<Arc<Polar>>,
    voice: Arc<output::Voice>,
    idle: Mutex<Vec<Instance<K::Bindings>>>,
}

struct Instance<B> {
    store: Store<StoreState>,
    bindings: B,
}

impl<K: Kind> Plugin<K> {
    /// Loads the plugin configured in `section` (config key `plugins.<kind>`): reads and compiles
    /// its component, checks its world, and configures a first instance.
    pub fn load(
        section: &PluginSection,
        cache_dir: Option<&Path>,
        polar: Option<Arc<Polar>>,
    ) -> Result<Self, PluginError> {
        let name: Arc<str> = format!("{} ({})", K::NAME, section.source).into();
        let load_error = |key: &str, message: String| PluginError::Load {
            key: format!("plugins.{}.{key}", K::NAME),
            plugin: section.source.clone(),
            message,
        };
        let bytes = read_source(&section.source).map_err(|m| load_error("source", m))?;
        let component = runtime::compile(&bytes, cache_dir).map_err(|m| load_error("source", m))?;
        if let Some(version) = runtime::other_package_version(&component) {
            return Err(load_error(
                "source",
                format!(
                    "was built against goutube:plugins@{version}; this node implements \
                     goutube:plugins@{PACKAGE_VERSION}: rebuild it against this release's \
                     schema/wit (docs/plugins.md, Versioning)"
                ),
            ));
        }
        let pre = K::prepare(&component).map_err(|e| {
            load_error(
                "source",
                format!(
                    "does not implement the goutube:plugins/{} world: {e:#}",
                    K::NAME
                ),
            )
        })?;
        let config = match (&section.config_file, section.config.is_empty()) {
            (Some(path), true) => std::fs::read_to_string(path)
                .map_err(|e| load_error("config_file", format!("{}: {e}", path.display())))?,
            (Some(_), false) => {
                return Err(load_error(
                    "config",
                    "set either config or config_file, not both".into(),
                ));
            }
            (None, _) => section.config.clone(),
        };
        let plugin = Self {
            voice: Arc::new(output::Voice::new(name.clone(), K::NAME)),
            name,
            pre,
            config,
            timeout: Duration::from_millis(section.timeout_ms),
            max_memory_mib: section.max_memory_mib,
            polar,
            idle: Mutex::new(Vec::new()),
        };
        let instance = plugin.instantiate().map_err(|error| {
            // A configuration the plugin refused names its key; anything else, the plugin's.
            let configure_failed = matches!(&error, PluginError::Instantiate { message, .. }
                if message.starts_with("configure failed"));
            let key = match (configure_failed, section.config_file.is_some()) {
                (true, true) => "config_file",
                (true, false) => "config",
                (false, _) => "source",
            };
            load_error(key, error.to_string())
        })?;
        plugin.idle.lock().expect("poisoned").push(instance);
        Ok(plugin)
    }

    /// Its name in logs and metrics (its source).
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The deadline of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A new instance, configured.
    fn instantiate(&self) -> Result<Instance<K::Bindings>, PluginError> {
        let state = StoreState::new(
            self.voice.clone(),
            (self.max_memory_mib as usize) << 20,
            self.polar.clone(),
        );
        let mut store = runtime::store(state);
        runtime::set_deadline(&mut store, self.timeout);
        let instantiated = K::instantiate(&self.pre, &mut store);
        let last_words = store.data_mut().flush_output();
        let bindings = instantiated.map_err(|e| {
            let mut message = with_last_words(format!("{e:#}"), last_words);
            if message.contains("Cannot allocate memory") {
                message.push_str(
                    " (the process is out of memory or address space: is `ulimit -v` too low?)",
                );
            }
            PluginError::Instantiate {
                plugin: self.name.clone(),
                message,
            }
        })?;
        runtime::set_deadline(&mut store, self.timeout);
        let configured = K::configure(&bindings, &mut store, &self.config);
        let last_words = store.data_mut().flush_output();
        match configured {
            Ok(Ok(())) => Ok(Instance { store, bindings }),
            Ok(Err(message)) => Err(PluginError::Instantiate {
                plugin: self.name.clone(),
                message: format!("configure failed: {message}"),
            }),
            Err(error) => Err(self.classify(error, &store, last_words)),
        }
    }

    /// Calls into an instance under the deadline and the memory cap.
    pub fn call<R>(
        &self,
        function: &'static str,
        f: impl FnOnce(&K::Bindings, &mut Store<StoreState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let started = Instant::now();
        let recorded = crate::metrics::hot().plugin_call(K::NAME, function);
        recorded.calls.increment(1);
        let pooled = self.idle.lock().expect("poisoned").pop();
        let mut instance = match pooled {
            Some(instance) => instance,
            None => self
                .instantiate()
                .inspect_err(|_| self.count_error("instantiate"))?,
        };
        runtime::set_deadline(&mut instance.store, self.timeout);
        let result = f(&instance.bindings, &mut instance.store);
        recorded.seconds.record(started.elapsed().as_secs_f64());
        let last_words = instance.store.data_mut().flush_output();
        match result {
            Ok(value) => {
                let mut idle = self.idle.lock().expect("poisoned");
                if idle.len() < MAX_IDLE_INSTANCES {
                    idle.push(instance);
                }
                Ok(value)
            }
            Err(error) => {
                // The instance is poisoned: drop it; the next call instantiates a fresh one.
                let mut error = self.classify(error, &instance.store, last_words);
                if let PluginError::Timeout { on_cpu, .. } = &mut error {
                    *on_cpu = instance.store.data().on_cpu;
                }
                self.count_error(match error {
                    PluginError::Timeout { .. } => "timeout",
                    PluginError::OutOfMemory { .. } => "out_of_memory",
                    _ => "trap",
                });
                tracing::warn!(%error, "plugin call failed; its instance is replaced");
                Err(error)
            }
        }
    }

    fn count_error(&self, what: &'static str) {
        ::metrics::counter!(crate::metrics::PLUGIN_ERRORS, "plugin" => K::NAME, "error" => what)
            .increment(1);
    }

    fn classify(
        &self,
        error: wasmtime::Error,
        store: &Store<StoreState>,
        last_words: Option<String>,
    ) -> PluginError {
        let plugin = self.name.clone();
        if store.data().limits.exceeded {
            PluginError::OutOfMemory {
                plugin,
                limit_mib: self.max_memory_mib,
            }
        } else if error.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
            PluginError::Timeout {
                plugin,
                timeout: self.timeout,
                on_cpu: None,
            }
        } else {
            PluginError::Trap {
                plugin,
                message: with_last_words(format!("{error:#}"), last_words),
            }
        }
    }
}

/// A failure's message, with the last line the plugin printed to stderr before it (a guest's
/// panic message says more than the trap it ends in).
fn with_last_words(message: String, last_words: Option<String>) -> String {
    match last_words {
        Some(line) => format!("{message} (its last words on stderr: {line})"),
        None => message,
    }
}

/// The bytes of a component named by a `source` key: `builtin:NAME` or a file path.
fn read_source(source: &str) -> Result<Vec<u8>, String> {
    if let Some(name) = source.strip_prefix("builtin:") {
        return builtin::get(name).map(<[u8]>::to_vec).ok_or_else(|| {
            format!(
                "no built-in component {name:?} (built-ins: {})",
                builtin::NAMES.join(", ")
            )
        });
    }
    std::fs::read(source).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => {
            let relative = match Path::new(source).is_relative() {
                true => std::env::current_dir()
                    .map(|dir| format!(" (relative to {}, where the node runs)", dir.display()))
                    .unwrap_or_default(),
                false => String::new(),
            };
            format!("file {source} not found{relative}")
        }
        _ => format!("cannot read {source}: {error}"),
    })
}

/// One authorizer, one bundler, one placement, and the Polar policy they were loaded with.
pub struct PluginSet {
    /// The authorizer.
    pub authorizer: Plugin<AuthorizerKind>,
    /// The bundler.
    pub bundler: Plugin<BundlerKind>,
    /// The placement plugin.
    pub placement: Plugin<PlacementKind>,
    /// The Polar policy behind the host `polar` interface.
    pub polar: Arc<Polar>,
    /// Which load of the node's plugins this is (0 at start, +1 per reload): caches keep an
    /// answer only if it came from the generation they hold.
    generation: u64,
}

impl PluginSet {
    /// Loads every plugin `section` names. `data_dir` hosts the default compile cache.
    pub fn load(section: &PluginsSection, data_dir: &Path) -> Result<Self, PluginError> {
        let polar = Arc::new(load_policy(section.policy_file.as_deref())?);
        let cache_dir = section
            .cache_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("plugin-cache"));
        Ok(Self {
            authorizer: Plugin::load(&section.authorizer, Some(&cache_dir), Some(polar.clone()))?,
            bundler: Plugin::load(&section.bundler, Some(&cache_dir), None)?,
            placement: Plugin::load(&section.placement, Some(&cache_dir), None)?,
            polar,
            generation: 0,
        })
    }

    /// Which load this is: 0 at start, one more per reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The authorizer's decision on `request`.
    pub fn authorize(&self, request: &types::AuthzRequest) -> Result<types::Decision, PluginError> {
        self.authorizer
            .call("authorize", |b, store| b.call_authorize(store, request))
    }

    /// Frames the `payload` of `point` at `start` with the bundler. The payload stays in the
    /// host; the bundler reads it only if it transforms it.
    pub fn bundle(
        &self,
        point: &str,
        start: u64,
        payload: &Buffer,
    ) -> Result<bundles::Bundled, PluginError> {
        self.bundler.call("bundle", |b, store| {
            with_buffer(store, payload.clone(), |store, buffer| {
                b.call_bundle(store, point, start, buffer)
            })
        })
    }

    /// The record in `bytes` (a received bundle), or why the bundler rejected it. A payload range
    /// outside the bundle is a rejection too.
    pub fn unbundle(&self, bytes: Bytes) -> Result<Result<Record, String>, PluginError> {
        let held = Buffer::new(vec![bytes.clone()]);
        let found = self.bundler.call("unbundle", |b, store| {
            with_buffer(store, held, |store, buffer| b.call_unbundle(store, buffer))
        })?;
        Ok(found.and_then(|found| {
            let payload = match found.payload {
                bundles::FoundPayload::Within(span) => {
                    let end = span.offset.checked_add(span.len);
                    if end.is_none_or(|end| end > bytes.len() as u64) {
                        return Err(format!(
                            "the bundler placed the payload at [{}, +{}), outside the {}-byte record",
                            span.offset,
                            span.len,
                            bytes.len()
                        ));
                    }
                    bytes.slice(span.offset as usize..(span.offset + span.len) as usize)
                }
                bundles::FoundPayload::Rebuilt(payload) => Bytes::from(payload),
            };
            Ok(Record {
                point: found.point,
                start: found.start,
                payload,
            })
        }))
    }

    /// The names of up to `replicas` of `members` that own `key`, as the placement plugin answers.
    pub fn owners(
        &self,
        key: &str,
        members: &[types::Member],
        replicas: u32,
    ) -> Result<Vec<String>, PluginError> {
        self.placement.call("owners", |b, store| {
            b.call_owners(store, key, members, replicas)
        })
    }
}

/// A record as the bundler unbundled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The point it names.
    pub point: String,
    /// Where its payload starts in the point.
    pub start: u64,
    /// The payload.
    pub payload: Bytes,
}

/// Lends `buffer` to the guest for one call: it sits in the store's table during `call` only.
fn with_buffer<R>(
    store: &mut Store<StoreState>,
    buffer: Buffer,
    call: impl FnOnce(&mut Store<StoreState>, Resource<Buffer>) -> wasmtime::Result<R>,
) -> wasmtime::Result<R> {
    let owned = store.data_mut().table.push(buffer)?;
    let lent = Resource::new_borrow(owned.rep());
    let result = call(store, lent);
    store.data_mut().table.delete(owned)?;
    result
}

fn load_policy(file: Option<&Path>) -> Result<Polar, PluginError> {
    let error = |message: String| PluginError::Load {
        key: "plugins.policy_file".into(),
        plugin: "polar".into(),
        message,
    };
    match file {
        None => {
            Polar::load(polar::DEFAULT_POLICY, "policies/default.polar (built-in)").map_err(error)
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| error(format!("{}: {e}", path.display())))?;
            Polar::load(&text, &path.display().to_string()).map_err(error)
        }
    }
}

/// Most threads of the blocking pool running short plugin calls at once (`crate::askers`).
const MAX_ASKERS: usize = 16;

/// The node's current plugins; replaced as a whole on reload.
pub struct Plugins {
    current: RwLock<Arc<PluginSet>>,
    data_dir: PathBuf,
    /// The current set's generation, for whoever waits for a reload.
    generation: tokio::sync::watch::Sender<u64>,
    /// Where short calls (authorization, placement) run.
    askers: crate::askers::Askers,
}

impl Plugins {
    /// Loads every plugin `section` names (generation 0).
    pub fn load(section: &PluginsSection, data_dir: &Path) -> Result<Self, PluginError> {
        let set = PluginSet::load(section, data_dir)?;
        Ok(Self {
            current: RwLock::new(Arc::new(set)),
            data_dir: data_dir.to_owned(),
            generation: tokio::sync::watch::Sender::new(0),
            askers: crate::askers::Askers::new("plugins", MAX_ASKERS),
        })
    }

    /// The plugins to use for one call.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.read().expect("poisoned").clone()
    }

    /// Runs `call`, a short call (authorization, placement), with the current plugins, on the
    /// blocking pool, sharing the trip with the calls asked at the same time (`crate::askers`).
    /// `None` if it never ran to the end (a panic, or a runtime shutting down).
    pub async fn ask<R: Send + 'static>(
        &self,
        call: impl FnOnce(&PluginSet) -> R + Send + 'static,
    ) -> Option<R> {
        let plugins = self.current();
        self.askers.ask(move || call(&plugins)).await
    }

    /// The short calls waiting, and the askers running them.
    #[cfg(test)]
    pub(crate) fn askers_at_work(&self) -> (usize, usize) {
        self.askers.at_work()
    }

    /// Changes at every reload (to the new generation).
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Loads `section` and, only if everything loads, makes it current. Returns the new set's
    /// generation.
    pub fn reload(&self, section: &PluginsSection) -> Result<u64, PluginError> {
        let mut set = PluginSet::load(section, &self.data_dir)?;
        let generation = {
            let mut current = self.current.write().expect("poisoned");
            set.generation = current.generation + 1;
            *current = Arc::new(set);
            current.generation
        };
        self.generation.send_replace(generation);
        Ok(generation)
    }
}
