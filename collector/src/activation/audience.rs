//! Audience exports: a segment's members as a CSV in the customer-match shape that ad
//! platforms take (Google Ads Customer Match, Meta custom audiences): one row per
//! member, `Email`, `Phone`, `First Name` and `Last Name` normalised and SHA-256 hashed
//! (lowercase hex), `Country` and `Zip` in clear. Normalised: emails trimmed and
//! lower-cased; phones in E.164 (`+` and digits only); names trimmed and lower-cased.
//! A member with neither an email nor a phone is left out (a platform cannot match it).
//!
//! The file is written into a directory (atomically: a temporary file renamed) or
//! uploaded by HTTP POST (`text/csv`, signed like a webhook when a secret is set).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use kith_identity::profile::Profile;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::webhook;
use crate::segments::api::csv_field;

/// The header row.
pub const HEADER: &str = "Email,Phone,First Name,Last Name,Country,Zip";

/// Lowercase hex SHA-256 of `text`, or nothing for nothing.
pub fn hashed(text: Option<&str>) -> String {
    match text.filter(|t| !t.is_empty()) {
        Some(text) => Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        None => String::new(),
    }
}

/// An email as platforms match it.
pub fn normal_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// A phone in E.164: `+` then digits.
pub fn normal_phone(phone: &str) -> String {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    if digits.is_empty() {
        String::new()
    } else {
        format!("+{digits}")
    }
}

fn trait_text(profile: &Profile, names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        profile
            .traits
            .get(*name)
            .and_then(|t| t.value.as_str().map(str::to_owned))
            .or_else(|| {
                profile
                    .traits
                    .get(*name)
                    .filter(|t| t.value.is_number())
                    .map(|t| t.value.to_string())
            })
    })
}

/// The CSV row of a profile, or none when it has neither email nor phone.
pub fn row(profile: &Profile) -> Option<String> {
    let first = |kind: &str| {
        profile
            .identifiers
            .iter()
            .find(|i| i.kind == kind)
            .map(|i| i.value.clone())
    };
    let email = first("email").map(|e| normal_email(&e));
    let phone = first("phone")
        .map(|p| normal_phone(&p))
        .filter(|p| !p.is_empty());
    if email.is_none() && phone.is_none() {
        return None;
    }
    let name = |names: &[&str]| trait_text(profile, names).map(|n| n.trim().to_lowercase());
    let fields = [
        hashed(email.as_deref()),
        hashed(phone.as_deref()),
        hashed(name(&["first_name", "firstName"]).as_deref()),
        hashed(name(&["last_name", "lastName"]).as_deref()),
        trait_text(profile, &["country"]).unwrap_or_default(),
        trait_text(profile, &["zip", "postal_code", "postalCode"]).unwrap_or_default(),
    ];
    Some(
        fields
            .iter()
            .map(|f| csv_field(f))
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// Writes `csv` as `{dir}/{segment}-{time}.csv`, atomically.
///
/// # Errors
///
/// When the directory cannot be written.
pub fn write_file(dir: &Path, segment: &str, csv: &str) -> std::io::Result<PathBuf> {
    let name = format!(
        "{segment}-{}.csv",
        Timestamp::now().strftime("%Y%m%dT%H%M%S%.fZ")
    );
    write_named(dir, &name, csv)
}

/// Writes `csv` as `{dir}/{name}`, atomically (a temporary file, synced, renamed).
///
/// # Errors
///
/// When the directory cannot be written.
pub fn write_named(dir: &Path, name: &str, csv: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(csv.as_bytes())?;
    file.as_file().sync_all()?;
    file.persist(&path).map_err(|e| e.error)?;
    Ok(path)
}

/// Uploads `csv` to `url`; answers the status the server gave.
///
/// # Errors
///
/// When the request fails or the server does not answer 2xx.
pub fn upload(
    http: &reqwest::blocking::Client,
    outbound: &super::outbound::Outbound,
    url: &str,
    secret: Option<&str>,
    segment: &str,
    csv: String,
) -> Result<u16, String> {
    let url = outbound.check_url(url)?;
    let mut request = http
        .post(url)
        .header("content-type", "text/csv; charset=utf-8")
        .header("kith-segment", segment);
    if let Some(secret) = secret {
        let timestamp = Timestamp::now().as_second();
        let signature = webhook::sign(secret, timestamp, csv.as_bytes());
        request = request.header(
            webhook::SIGNATURE_HEADER,
            format!("t={timestamp},v1={signature}"),
        );
    }
    let response = request
        .body(csv)
        .send()
        .map_err(|e| format!("upload failed: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        Err(format!("upload answered {status}"))
    }
}

/// What an export did, for the API.
pub fn report(rows: usize, skipped: usize, file: Option<&Path>, status: Option<u16>) -> Value {
    serde_json::json!({
        "rows": rows,
        "skipped_without_email_or_phone": skipped,
        "file": file.map(|f| f.display().to_string()),
        "uploaded_status": status,
    })
}
