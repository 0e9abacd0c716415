//! The one place `bindgen!` runs: host bindings for the three worlds of `schema/wit/`, and the
//! host side of the interfaces components import (`log`, `polar`).
//!
//! The `types` and `log` interfaces are generated once, with the authorizer world, and shared by
//! the other two worlds through `with`, so one implementation serves every plugin. `polar` is
//! for authorizers, `checksum` (hardware CRC32C) for bundlers.
//!
//! `checksum` is linked by hand rather than through its generated trait: the generated host
//! function receives a `Vec<u8>`, a copy of every record the bundler checks; a [`WasmList`] lets
//! the host checksum the bytes where they lie in the guest's memory.

use wasmtime::StoreContextMut;
use wasmtime::component::{HasSelf, Linker, WasmList};

use super::runtime::StoreState;

pub mod authorizer {
    wasmtime::component::bindgen!({
        world: "authorizer",
        path: "../schema/wit",
    });
}

pub mod bundler {
    wasmtime::component::bindgen!({
        world: "bundler",
        path: "../schema/wit",
        with: {
            "goutube:plugins/types": super::authorizer::goutube::plugins::types,
            "goutube:plugins/log": super::authorizer::goutube::plugins::log,
        },
    });
}

pub mod placement {
    wasmtime::component::bindgen!({
        world: "placement",
        path: "../schema/wit",
        with: {
            "goutube:plugins/types": super::authorizer::goutube::plugins::types,
            "goutube:plugins/log": super::authorizer::goutube::plugins::log,
        },
    });
}

pub use authorizer::goutube::plugins::types;
use authorizer::goutube::plugins::{log, polar};

impl types::Host for StoreState {}

impl log::Host for StoreState {
    fn log(&mut self, level: log::Level, message: String) {
        let plugin = &*self.plugin;
        match level {
            log::Level::Trace => tracing::trace!(plugin, "{message}"),
            log::Level::Debug => tracing::debug!(plugin, "{message}"),
            log::Level::Info => tracing::info!(plugin, "{message}"),
            log::Level::Warn => tracing::warn!(plugin, "{message}"),
            log::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

/// Links what an authorizer imports: `types`, `log` and `polar`.
pub fn link_authorizer(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    authorizer::Authorizer::add_to_linker::<_, HasSelf<_>>(linker, |s| s)
}

/// Links what a placement imports: `types` and `log`.
pub fn link_placement(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    placement::Placement::add_to_linker::<_, HasSelf<_>>(linker, |s| s)
}

/// The instance name of the `checksum` interface; it follows the WIT package's version.
const CHECKSUM_INTERFACE: &str = "goutube:plugins/checksum@0.1.0";

/// Links what a bundler imports: `types` and `log` as generated, `checksum` reading the guest's
/// memory in place.
pub fn link_bundler(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    types::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    log::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    linker.instance(CHECKSUM_INTERFACE)?.func_wrap(
        "crc32c",
        |store: StoreContextMut<'_, StoreState>, (crc, bytes): (u32, WasmList<u8>)| {
            Ok((crc32c::crc32c_append(crc, bytes.as_le_slice(&store)),))
        },
    )
}

impl polar::Host for StoreState {
    fn is_allowed(&mut self, actor: String, action: String, point: String) -> Result<bool, String> {
        match &self.polar {
            Some(policy) => policy.is_allowed(&actor, &action, &point),
            None => Err("no Polar policy is loaded for this plugin".into()),
        }
    }
}
