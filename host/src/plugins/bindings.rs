//! The one place `bindgen!` runs: host bindings for the three worlds of `schema/wit/`, and the
//! host side of the interfaces components import (`log`, `polar`).
//!
//! The `types` and `log` interfaces are generated once, with the authorizer world, and shared by
//! the other worlds through `with`, so one implementation serves every plugin. `polar` is
//! for authorizers, `checksum` (hardware CRC32C) for bundlers.
//!
//! `checksum` is linked by hand rather than through its generated trait: the generated host
//! function receives a `Vec<u8>`, a copy of the bytes the bundler checks; a [`WasmList`] lets the
//! host checksum them where they lie in the guest's memory.
//!
//! A bundler's payload is a [`Buffer`] resource in the store's table: the guest asks its length
//! and CRC32C without the bytes crossing into its memory, and copies in only the ranges it reads.

use bytes::Bytes;
use wasmtime::StoreContextMut;
use wasmtime::component::{HasSelf, Linker, Resource, WasmList};

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
            "goutube:plugins/log": super::authorizer::goutube::plugins::log,
            "goutube:plugins/bundles.buffer": super::Buffer,
        },
        // A range outside the buffer traps the call.
        imports: { default: trappable },
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
pub use bundler::goutube::plugins::bundles;

/// The version of the `goutube:plugins` package this host implements (`schema/wit`).
pub const PACKAGE_VERSION: &str = "0.2.0";

/// Bytes a bundler call works on, held by the host: a payload (possibly several pieces of a
/// point, back to back) or a received bundle.
#[derive(Debug, Clone, Default)]
pub struct Buffer {
    pieces: Vec<Bytes>,
    len: u64,
}

impl Buffer {
    pub fn new(pieces: Vec<Bytes>) -> Self {
        let len = pieces.iter().map(|p| p.len() as u64).sum();
        Self { pieces, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// The parts of the pieces that make `[offset, offset + len)`, or an error if the range is
    /// not within the buffer.
    pub fn range(&self, offset: u64, len: u64) -> Result<Vec<Bytes>, String> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(format!(
                "range [{offset}, +{len}) is outside the {}-byte buffer",
                self.len
            ));
        }
        let (mut skip, mut left) = (offset, len);
        let mut parts = Vec::new();
        for piece in &self.pieces {
            let size = piece.len() as u64;
            if skip >= size {
                skip -= size;
                continue;
            }
            if left == 0 {
                break;
            }
            let take = (size - skip).min(left);
            parts.push(piece.slice(skip as usize..(skip + take) as usize));
            left -= take;
            skip = 0;
        }
        Ok(parts)
    }
}

impl bundles::Host for StoreState {}

impl bundles::HostBuffer for StoreState {
    fn len(&mut self, buffer: Resource<Buffer>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&buffer)?.len())
    }

    fn crc32c(
        &mut self,
        buffer: Resource<Buffer>,
        crc: u32,
        offset: u64,
        len: u64,
    ) -> wasmtime::Result<u32> {
        let parts = self
            .table
            .get(&buffer)?
            .range(offset, len)
            .map_err(wasmtime::Error::msg)?;
        Ok(parts
            .iter()
            .fold(crc, |crc, part| crc32c::crc32c_append(crc, part)))
    }

    fn read(
        &mut self,
        buffer: Resource<Buffer>,
        offset: u64,
        len: u64,
    ) -> wasmtime::Result<Vec<u8>> {
        let parts = self
            .table
            .get(&buffer)?
            .range(offset, len)
            .map_err(wasmtime::Error::msg)?;
        Ok(parts.concat())
    }

    fn drop(&mut self, buffer: Resource<Buffer>) -> wasmtime::Result<()> {
        self.table.delete(buffer)?;
        Ok(())
    }
}

impl types::Host for StoreState {}

impl log::Host for StoreState {
    fn log(&mut self, level: log::Level, message: String) {
        use super::output::Level;
        let level = match level {
            log::Level::Trace => Level::Trace,
            log::Level::Debug => Level::Debug,
            log::Level::Info => Level::Info,
            log::Level::Warn => Level::Warn,
            log::Level::Error => Level::Error,
        };
        self.voice.say(level, "log", &message);
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

/// Links what a bundler imports: `log` and `bundles` as generated, `checksum` (under its
/// versioned name) reading the guest's memory in place.
pub fn link_bundler(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    log::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    bundles::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    let checksum = format!("goutube:plugins/checksum@{PACKAGE_VERSION}");
    linker.instance(&checksum)?.func_wrap(
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
