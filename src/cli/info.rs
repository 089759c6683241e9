//! `amend info`: print the libtorch runtime.

use anyhow::Result;

/// Print the libtorch runtime amend uses: version, location, device and threads.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `amend info`.
pub fn run(args: &InfoArgs) -> Result<()> {
    let info = amend::runtime::RuntimeInfo::detect();
    let text = if args.json { serde_json::to_string_pretty(&info)? } else { info.to_string() };
    super::score::emit(&format!("{text}\n"))
}
