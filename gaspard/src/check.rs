//! `gaspard --check`: load and validate the handler in this process, say what
//! was found, and exit, like `nginx -t`.

use crate::plugin::Plugin;
use gaspard_handler_abi::ABI_VERSION;
use std::path::Path;

/// Loads the handler, runs its init with `config`, and shuts it down again.
/// Returns the report for stdout, or the reason for refusing it.
pub fn check(handler: &Path, config: &str) -> Result<String, String> {
    let path = std::fs::canonicalize(handler)
        .map_err(|e| format!("handler {}: cannot open: {e}", handler.display()))?;
    let plugin = Plugin::load(&path, config).map_err(|e| e.to_string())?;
    let report = format!(
        "handler {}: ok: {:?} speaks handler ABI version {ABI_VERSION}, init succeeded",
        path.display(),
        plugin.name()
    );
    drop(plugin);
    Ok(report)
}
