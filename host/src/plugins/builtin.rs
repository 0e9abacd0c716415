//! The components that ship inside the binary, selectable as `builtin:NAME`. The build script
//! compiles them from `plugins/` and generates `NAMES` and `get` from its list of built-ins.

include!(concat!(env!("OUT_DIR"), "/builtins.rs"));

/// Where the build script compiled the plugin workspace: the test components
/// (`misbehaving_authorizer.wasm`, `template.wasm`) are there too.
pub const BUILD_DIR: &str = env!("WASM_PLUGIN_BUILD_DIR");
