//! The one place `bindgen!` runs: host bindings for the three worlds of `schema/wit/`, and the
//! host side of the interfaces components import (`log`, `polar`).
//!
//! The `types` and `log` interfaces are generated once, with the authorizer world, and shared by
//! the other two worlds through `with`, so one implementation serves every plugin. `polar` is
//! for authorizers, `checksum` (hardware CRC32C) for bundlers.

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

impl bundler::goutube::plugins::checksum::Host for StoreState {
    fn crc32c(&mut self, crc: u32, bytes: Vec<u8>) -> u32 {
        crc32c::crc32c_append(crc, &bytes)
    }
}

impl polar::Host for StoreState {
    fn is_allowed(&mut self, actor: String, action: String, point: String) -> Result<bool, String> {
        match &self.polar {
            Some(policy) => policy.is_allowed(&actor, &action, &point),
            None => Err("no Polar policy is loaded for this plugin".into()),
        }
    }
}
