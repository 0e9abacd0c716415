//! The components that ship inside the binary, selectable as `builtin:NAME`. The build script
//! compiles them from `plugins/`.

macro_rules! component {
    ($file:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/plugins/", $file))
    };
}

pub const NAMES: [&str; 6] = [
    "polar-authorizer",
    "acl-authorizer",
    "crc-bundler",
    "lz4-bundler",
    "ring-placement",
    "rendezvous-placement",
];

/// The bytes of built-in component `name`.
pub fn get(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "polar-authorizer" => component!("polar_authorizer.wasm"),
        "acl-authorizer" => component!("acl_authorizer.wasm"),
        "crc-bundler" => component!("crc_bundler.wasm"),
        "lz4-bundler" => component!("lz4_bundler.wasm"),
        "ring-placement" => component!("ring_placement.wasm"),
        "rendezvous-placement" => component!("rendezvous_placement.wasm"),
        _ => return None,
    })
}

/// Where the build script compiled the plugin workspace: the test components
/// (`misbehaving_authorizer.wasm`, `template.wasm`) are there too.
pub const BUILD_DIR: &str = env!("WASM_PLUGIN_BUILD_DIR");
