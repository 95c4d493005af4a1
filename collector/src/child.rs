//! Runs the `kith-collector` binary as a child process on a free port of 127.0.0.1, for
//! the load tool and the tests that kill it: [`spawn`] starts it and reads the address
//! it prints.

use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `binary` with its data in `data_dir`, the given credentials and `extra` flags,
/// and waits for its `listening on http://…` line. Its output is drained in the background so it never
/// blocks on a full pipe. Answers the child and its base URL.
///
/// # Errors
///
/// When the binary cannot be started or exits before printing its address.
pub fn spawn(
    binary: &Path,
    data_dir: &Path,
    write_key: &str,
    admin_token: &str,
    extra: &[&str],
) -> io::Result<(Child, String)> {
    let mut child = Command::new(binary)
        .args(["--listen", "127.0.0.1:0", "--write-key", write_key])
        .args(["--admin-token", admin_token])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if let Some(url) = line?.strip_prefix("listening on ") {
            let url = url.to_owned();
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((child, url));
        }
    }
    Err(io::Error::other(format!(
        "{} exited before printing its address",
        binary.display()
    )))
}
