//! The WebAssembly runtime shared by every plugin of the process: one `Engine` (epoch
//! interruption), a ticker thread that advances the epoch, components compiled once (in memory
//! by content, on disk by content and engine), and the data each `Store` carries.
//!
//! Memory is taken as it is used: no address space is reserved up front (a pool of 1,000
//! slots of 1 GiB reserved a terabyte, and a node under `ulimit -v` died), each instance's
//! linear memory is allocated at its size plus [`GROWTH`], and moves if it grows past that (up
//! to its plugin's `max_memory_mib`). Bounds are checked in the compiled code, with a small
//! guard region. A node whose address space is limited thus needs about 20 MiB per live
//! instance.
//!
//! A call's deadline is a point in time, not a number of ticks: at every tick that finds a call
//! still running, [`StoreState::deadline`] is compared with the clock, so a ticker that falls
//! behind on a loaded machine delays the interruption by one tick at most instead of stretching
//! the deadline.
//!
//! Plugins are called only on threads that drive no async runtime (the blocking pool, or a plain
//! thread): WASI's synchronous host functions block on the runtime of the calling thread, which
//! panics inside one.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, ResourceLimiter, Store, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::output::{Output, Voice};
use super::polar::Polar;

/// How often the epoch advances: the granularity of plugin deadlines.
pub const TICK: Duration = Duration::from_millis(2);

/// Largest linear memory any plugin may be configured for.
pub const MAX_MEMORY_BYTES: usize = 1 << 30;

/// Address space a linear memory takes beyond its size, to grow into without moving.
const GROWTH: u64 = 16 << 20;
/// Unmapped bytes after a linear memory (bounds are checked in the code: this only lets the
/// compiler merge checks of nearby accesses).
const GUARD: u64 = 64 << 10;

/// The engine of this process, created on first use with its epoch ticker.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::OnDemand)
            .memory_reservation(0)
            .memory_reservation_for_growth(GROWTH)
            .memory_guard_size(GUARD)
            .memory_may_move(true);
        let engine = Engine::new(&config).expect("the plugin engine configuration is valid");
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("goutube-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    ticker.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker");
        engine
    })
}

/// A store for one instance of a plugin, its deadline checked against the clock at each tick.
///
/// The ticks also time the call's thread on a CPU, for the message of a timeout: its CPU time
/// at the call's first tick, and again when the deadline interrupts it. A call that ends
/// before its first tick, nearly every call, costs no such reading.
pub fn store(state: StoreState) -> Store<StoreState> {
    let mut store = Store::new(engine(), state);
    store.limiter(|state| &mut state.limits);
    store.epoch_deadline_callback(|mut context| {
        let state = context.data_mut();
        let Some(deadline) = state.deadline else {
            return Ok(UpdateDeadline::Continue(1));
        };
        if Instant::now() < deadline {
            if state.cpu_at_first_tick.is_none() {
                state.cpu_at_first_tick = thread_cpu_time();
            }
            return Ok(UpdateDeadline::Continue(1));
        }
        state.on_cpu = state
            .cpu_at_first_tick
            .zip(thread_cpu_time())
            .map(|(first, now)| now.saturating_sub(first));
        Ok(UpdateDeadline::Interrupt)
    });
    store
}

/// Starts a call on `store` that may run for `timeout`.
pub fn set_deadline(store: &mut Store<StoreState>, timeout: Duration) {
    let state = store.data_mut();
    state.deadline = Some(Instant::now() + timeout);
    state.cpu_at_first_tick = None;
    state.on_cpu = None;
    store.set_epoch_deadline(1);
}

/// The CPU time the calling thread has used so far (user and system); `None` if the kernel
/// does not say.
pub fn thread_cpu_time() -> Option<Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid place for one `rusage`, which the call fills.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: zeroed is a valid `rusage`, and the call succeeded.
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Some(time(usage.ru_utime) + time(usage.ru_stime))
}

/// Compiles `bytes` into a component, at most once per process per content, and at most once per
/// engine version on disk when `cache_dir` is given. Errors are sentences for the operator.
pub fn compile(bytes: &[u8], cache_dir: Option<&Path>) -> Result<Component, String> {
    static COMPILED: OnceLock<Mutex<HashMap<[u8; 32], Component>>> = OnceLock::new();
    check_header(bytes)?;
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    let compiled = COMPILED.get_or_init(Default::default);
    if let Some(component) = compiled.lock().expect("poisoned").get(&digest) {
        return Ok(component.clone());
    }
    let engine = engine();
    let component = match cache_dir {
        Some(dir) => compile_cached(engine, bytes, &digest, dir)?,
        None => {
            Component::new(engine, bytes).map_err(|e| format!("not a valid component: {e:?}"))?
        }
    };
    compiled
        .lock()
        .expect("poisoned")
        .insert(digest, component.clone());
    Ok(component)
}

/// Tells a core module or a non-WebAssembly file apart from a component, with a useful message.
fn check_header(bytes: &[u8]) -> Result<(), String> {
    match bytes.get(0..8) {
        Some([0, b'a', b's', b'm', 0x0d, 0, 0x01, 0]) => Ok(()),
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => Err(
            "is a core WebAssembly module, not a component: build it for wasm32-wasip2 (or wrap \
             it with `wasm-tools component new`)"
                .into(),
        ),
        _ => Err("is not WebAssembly (no \\0asm header)".into()),
    }
}

fn compile_cached(
    engine: &Engine,
    bytes: &[u8],
    digest: &[u8; 32],
    dir: &Path,
) -> Result<Component, String> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("{hex}-{:016x}.cwasm", hasher.finish()));
    if path.exists() {
        // SAFETY: files in the cache directory are artifacts this program wrote with
        // `Engine::precompile_component` (the directory is private to the node, created 0700);
        // wasmtime refuses an artifact whose engine configuration or version differs.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "recompiling a stale cached component")
            }
        }
    }
    let artifact = engine
        .precompile_component(bytes)
        .map_err(|e| format!("not a valid component: {e:?}"))?;
    if let Err(error) = write_private(dir, &path, &artifact) {
        tracing::warn!(path = %path.display(), %error, "cannot cache the compiled component");
    }
    // SAFETY: `artifact` was produced just above by this engine.
    unsafe { Component::deserialize(engine, &artifact) }
        .map_err(|e| format!("loading the compiled component: {e:?}"))
}

/// Writes `bytes` to `path` atomically, in a directory only this user can read.
fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

/// The version of the `goutube:plugins` package `component` imports from, when it is not the one
/// this host implements (`None` when it matches or imports nothing of the package).
pub fn other_package_version(component: &Component) -> Option<String> {
    let host = super::PACKAGE_VERSION;
    component
        .component_type()
        .imports(engine())
        .filter_map(|(name, _)| name.strip_prefix("goutube:plugins/"))
        .filter_map(|interface| interface.split_once('@').map(|(_, version)| version))
        .find(|version| *version != host)
        .map(str::to_owned)
}

/// A linker with WASI (no files, network or environment are granted) and `add` for the world's
/// own imports.
pub fn linker(
    add: impl FnOnce(&mut Linker<StoreState>) -> wasmtime::Result<()>,
) -> wasmtime::Result<Linker<StoreState>> {
    let mut linker = Linker::new(engine());
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    add(&mut linker)?;
    Ok(linker)
}

/// What a plugin's `Store` holds.
pub struct StoreState {
    wasi: WasiCtx,
    /// WASI's resources and the bundler's buffers.
    pub(super) table: ResourceTable,
    /// The memory cap of the current instance.
    pub limits: MemoryLimit,
    /// The plugin's log lines (its `log` import, what it prints), rate-limited.
    pub voice: Arc<Voice>,
    /// What the guest printed during the current call.
    pub stdout: Output,
    /// What the guest wrote to stderr during the current call.
    pub stderr: Output,
    /// When the current call must have returned.
    pub deadline: Option<Instant>,
    /// The CPU time of the current call's thread at the call's first tick (within a tick of
    /// its start), if it ran that long.
    cpu_at_first_tick: Option<Duration>,
    /// For a call its deadline interrupted: how long its thread ran on a CPU from its first
    /// tick, when measured.
    pub on_cpu: Option<Duration>,
    /// The host Polar policy behind the `polar` interface (authorizers only).
    pub polar: Option<Arc<Polar>>,
}

impl StoreState {
    /// The state of one instance: its voice, its memory cap, and the policy it may ask.
    pub fn new(voice: Arc<Voice>, max_memory: usize, polar: Option<Arc<Polar>>) -> Self {
        let (stdout, stderr) = (Output::default(), Output::default());
        Self {
            // Prints are kept in the host and logged after the call; nothing else is granted.
            wasi: WasiCtxBuilder::new()
                .stdout(stdout.clone())
                .stderr(stderr.clone())
                .build(),
            table: ResourceTable::new(),
            limits: MemoryLimit {
                max_bytes: max_memory,
                exceeded: false,
            },
            voice,
            stdout,
            stderr,
            deadline: None,
            cpu_at_first_tick: None,
            on_cpu: None,
            polar,
        }
    }

    /// Logs what the guest printed since the last call; the last line of its stderr, if any.
    pub fn flush_output(&mut self) -> Option<String> {
        self.voice.printed(self.stdout.take(), self.stderr.take())
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps a plugin's linear memory and remembers when the cap was hit, so that the trap that
/// follows (an allocation failure aborts the guest) is reported as out-of-memory.
pub struct MemoryLimit {
    max_bytes: usize,
    /// Whether the cap was hit.
    pub exceeded: bool,
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
