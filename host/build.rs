//! Build script:
//!
//! 1. compiles the gRPC contract in `schema/proto/` (the client API and the controller's wire)
//!    with protox (no `protoc` needed), generates the tonic services, and writes the descriptor
//!    set that server reflection serves;
//! 2. builds the plugin workspace `plugins/` for `wasm32-wasip2` with a nested cargo (its own
//!    target directory, `<target>/wasm-plugins`: the outer build holds the lock of its own), copies
//!    the built-in components to `OUT_DIR/plugins/`, writes `OUT_DIR/builtins.rs` (their names
//!    and `include_bytes!`), and exports the build directory, where the test components are too,
//!    as `WASM_PLUGIN_BUILD_DIR`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use prost::Message;

/// Crates of the plugin workspace embedded in the binary as `builtin:NAME`.
const BUILTINS: [&str; 6] = [
    "polar-authorizer",
    "acl-authorizer",
    "crc-bundler",
    "lz4-bundler",
    "ring-placement",
    "rendezvous-placement",
];

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("host/ has a parent")?
        .to_owned();
    compile_proto(&root, &out_dir)?;
    build_plugins(&root, &out_dir)?;
    rustc_version()?;
    Ok(())
}

/// `BUILT_WITH_RUSTC`: the compiler's version, for `goutube_build_info`.
fn rustc_version() -> anyhow::Result<()> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = std::process::Command::new(&rustc)
        .arg("--version")
        .output()
        .with_context(|| format!("running {rustc} --version"))?;
    let version = String::from_utf8_lossy(&output.stdout);
    let version = version.split_whitespace().nth(1).unwrap_or("unknown");
    println!("cargo:rustc-env=BUILT_WITH_RUSTC={version}");
    Ok(())
}

fn compile_proto(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let schema = root.join("schema/proto");
    let protos = [
        schema.join("streaming/v1/streaming.proto"),
        schema.join("controller/v1/controller.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let fds = protox::compile(&protos, [&schema]).context("compiling the gRPC contract")?;
    std::fs::write(
        out_dir.join("streaming_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(fds)
        .context("generating the tonic services")?;
    Ok(())
}

fn build_plugins(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let workspace = root.join("plugins");
    println!("cargo:rerun-if-changed={}", workspace.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("schema/wit").display()
    );
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => root.join("target"),
    }
    .join("wasm-plugins");

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--workspace",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Settings meant for the host build must not leak into the WebAssembly build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_PROFILE_RELEASE_DEBUG")
        .status()
        .context("running cargo for the plugin components")?;
    if !status.success() {
        bail!(
            "building the plugin components failed ({status}); is the wasm32-wasip2 target \
             installed? (`rustup target add wasm32-wasip2`, or scripts/setup)"
        );
    }

    let built = target_dir.join("wasm32-wasip2/release");
    let embedded = out_dir.join("plugins");
    std::fs::create_dir_all(&embedded)?;
    // `src/plugins/builtin.rs` includes this: the names and bytes of the built-ins, from the one
    // list above.
    let mut table = format!(
        "/// The names of the built-in components (`builtin:NAME`).\npub const NAMES: [&str; {}] = {BUILTINS:?};\n\n",
        BUILTINS.len()
    );
    table.push_str("/// The bytes of built-in component `name`.\n");
    table.push_str("pub fn get(name: &str) -> Option<&'static [u8]> {\n    match name {\n");
    for name in BUILTINS {
        let file = format!("{}.wasm", name.replace('-', "_"));
        std::fs::copy(built.join(&file), embedded.join(&file))
            .with_context(|| format!("copying the {name} component"))?;
        table.push_str(&format!(
            "        {name:?} => Some(include_bytes!(concat!(env!(\"OUT_DIR\"), \"/plugins/{file}\"))),\n"
        ));
    }
    table.push_str("        _ => None,\n    }\n}\n");
    std::fs::write(out_dir.join("builtins.rs"), table)?;
    println!("cargo:rustc-env=WASM_PLUGIN_BUILD_DIR={}", built.display());
    Ok(())
}
