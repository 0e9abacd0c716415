//! Regenerates `host/src/replication/replication_capnp.rs` from
//! `schema/capnp/replication.capnp` with the `capnp` compiler (Debian package `capnproto`), and
//! formats it with rustfmt. `--check` writes nothing and fails if the committed file is stale.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let schema = root.join("schema/capnp");
    let committed = root.join("host/src/replication/replication_capnp.rs");
    let out = tempfile::tempdir()?;
    capnpc::CompilerCommand::new()
        .src_prefix(&schema)
        .file(schema.join("replication.capnp"))
        .output_path(out.path())
        .default_parent_module(vec!["replication".into()])
        .run()
        .context("running the capnp compiler (apt-get install capnproto)")?;
    let generated = out.path().join("replication_capnp.rs");
    let status = Command::new("rustfmt")
        .args(["--edition", "2024"])
        .arg(&generated)
        .status()
        .context("running rustfmt")?;
    if !status.success() {
        bail!("rustfmt failed on the generated code");
    }
    let fresh = std::fs::read_to_string(&generated)?;
    if check {
        let current = std::fs::read_to_string(&committed).unwrap_or_default();
        if current != fresh {
            bail!(
                "{} is stale: run scripts/capnp-generate and commit the result",
                committed.display()
            );
        }
        println!("{} is current", committed.display());
    } else {
        std::fs::write(&committed, fresh)?;
        println!("wrote {}", committed.display());
    }
    Ok(())
}
