//! `kith-collector import FILE`: imports a local file through a running collector's
//! `POST /v1/imports` (streamed, never read whole into memory), waits for the import to
//! finish and prints its report. Exits 0 when it succeeded, 2 when it partially
//! succeeded, 1 when it failed.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::blocking::{Body, Client};

use super::{Format, ImportReport, Mapping, Status};

/// How often the report is polled while the import runs.
const POLL: Duration = Duration::from_millis(200);

/// The `import` command's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The file: CSV or NDJSON, optionally gzip-compressed (`.gz`).
    pub file: PathBuf,
    /// The collector's base URL.
    #[arg(long, env = "KITH_URL", default_value = "http://127.0.0.1:8787")]
    pub url: String,
    /// A secret that may import: the admin token, or the source's import key (never
    /// the write key).
    #[arg(long, env = "KITH_IMPORT_KEY")]
    pub key: String,
    /// The source to import into (`src_…`), needed with the admin token when the
    /// collector has several.
    #[arg(long)]
    pub source: Option<String>,
    /// How records become messages.
    #[command(flatten)]
    pub mapping: Mapping,
}

/// Runs the command; answers the process exit code.
///
/// # Errors
///
/// When the file cannot be read or the collector cannot be reached or refuses it.
pub fn run(mut args: ImportArgs) -> Result<i32, Box<dyn std::error::Error>> {
    let name = args.file.to_string_lossy().into_owned();
    let gzip = name.ends_with(".gz");
    let base = name.trim_end_matches(".gz");
    if args.mapping.format.is_none() {
        args.mapping.format = if base.ends_with(".csv") {
            Some(Format::Csv)
        } else if base.ends_with(".ndjson") || base.ends_with(".jsonl") {
            Some(Format::Ndjson)
        } else {
            return Err(
                format!("cannot tell the format of {name}: give --format csv or ndjson").into(),
            );
        };
    }
    let file = std::fs::File::open(&args.file).map_err(|e| format!("cannot open {name}: {e}"))?;
    let http = Client::builder().timeout(None).build()?;
    let url = args.url.trim_end_matches('/');
    let mut request = http
        .post(format!("{url}/v1/imports"))
        .bearer_auth(&args.key)
        .query(&args.mapping)
        .body(Body::from(file));
    if let Some(source) = &args.source {
        request = request.query(&[("source", source)]);
    }
    if gzip {
        request = request.header("content-encoding", "gzip");
    }
    let response = request.send()?;
    if !response.status().is_success() {
        return Err(format!(
            "the collector refused the import: {} {}",
            response.status(),
            response.text()?
        )
        .into());
    }
    let mut report: ImportReport = response.json()?;
    eprintln!("import {} accepted; waiting for it to finish", report.id);
    while report.status == Status::Processing {
        std::thread::sleep(POLL);
        report = http
            .get(format!("{url}/v1/imports/{}", report.id))
            .bearer_auth(&args.key)
            .send()?
            .error_for_status()?
            .json()?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(match report.status {
        Status::Succeeded => 0,
        Status::PartiallySucceeded => 2,
        Status::Processing | Status::Failed => 1,
    })
}
