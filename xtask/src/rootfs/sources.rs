//! The host's apt sources, read to find the Debian mirror debootstrap downloads from: deb822
//! `*.sources` files and one-line `deb URI suite components` entries in `sources.list` and
//! `*.list` files. The mirror is taken from this machine each time; it never enters the
//! project or an image's cache key.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};

const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// URI schemes debootstrap can download from.
const DEBOOTSTRAP_SCHEMES: [&str; 4] = ["http://", "https://", "ftp://", "file:/"];

/// One source entry: a deb822 stanza or a one-line entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct AptSource {
    pub(super) types: Vec<String>,
    pub(super) uris: Vec<String>,
    pub(super) suites: Vec<String>,
    pub(super) components: Vec<String>,
    /// The keyring (or inline key) the source is verified with, if it names one.
    pub(super) signed_by: Option<String>,
}

/// The mirror of the first `deb` source on this machine that carries `suite` with `main`.
pub(super) fn host_mirror(suite: &str) -> Result<String> {
    let files = source_files()?;
    let mut sources = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
        sources.extend(match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => parse_deb822(&text),
            _ => parse_one_line(&text),
        });
    }
    select_mirror(&sources, suite)
        .map(str::to_owned)
        .with_context(|| {
            format!("no `deb` source for `{suite}` with component `main` in {files:?}; debootstrap needs a Debian mirror")
        })
}

/// The files apt reads, in its order: `sources.list`, then `sources.list.d/*.list` and
/// `*.sources` sorted by name.
fn source_files() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = Some(PathBuf::from(SOURCES_LIST))
        .filter(|path| path.is_file())
        .into_iter()
        .collect();
    let Ok(entries) = fs::read_dir(SOURCES_DIR) else {
        return Ok(files);
    };
    let mut listed = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("read {SOURCES_DIR}"))?.path();
        let kind = path.extension().and_then(|e| e.to_str());
        if matches!(kind, Some("list" | "sources")) && path.is_file() {
            listed.push(path);
        }
    }
    listed.sort();
    files.extend(listed);
    Ok(files)
}

/// Parses a deb822 `.sources` file. Stanzas are separated by blank lines, `#` starts a
/// comment line, field names are case-insensitive, indented lines continue a field, and a
/// stanza with `Enabled: no` is dropped.
pub(super) fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            sources.extend(stanza(&fields));
            fields.clear();
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    sources.extend(stanza(&fields));
    sources
}

fn stanza(fields: &[(String, String)]) -> Option<AptSource> {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let words = |name: &str| -> Vec<String> {
        field(name)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let enabled = field("enabled").is_none_or(|value| !value.eq_ignore_ascii_case("no"));
    let source = AptSource {
        types: words("types"),
        uris: words("uris"),
        suites: words("suites"),
        components: words("components"),
        signed_by: field("signed-by").map(str::to_owned),
    };
    (enabled && !source.types.is_empty()).then_some(source)
}

/// Parses one-line entries: `deb [options] URI suite [component...]`; `#` starts a comment.
pub(super) fn parse_one_line(text: &str) -> Vec<AptSource> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<AptSource> {
    let line = line.split('#').next().unwrap_or_default().trim();
    let (kind, rest) = line.split_once(char::is_whitespace)?;
    if kind != "deb" && kind != "deb-src" {
        return None;
    }
    let rest = rest.trim_start();
    let (options, rest) = match rest.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']')?,
        None => ("", rest),
    };
    let mut words = rest.split_whitespace().map(str::to_owned);
    let uri = words.next()?;
    let suite = words.next()?;
    Some(AptSource {
        types: vec![kind.to_owned()],
        uris: vec![uri],
        suites: vec![suite],
        components: words.collect(),
        signed_by: options
            .split_whitespace()
            .find_map(|option| option.strip_prefix("signed-by="))
            .map(str::to_owned),
    })
}

/// The first URI debootstrap can use of the first `deb` source carrying `suite` with
/// `main`. Sources verified with Debian's archive keyring, or naming no keyring (as
/// Debian's own default entries do), come before those with a keyring of their own, so a
/// third-party repository that also calls its suite `bookworm` is not taken for Debian.
pub(super) fn select_mirror<'a>(sources: &'a [AptSource], suite: &str) -> Option<&'a str> {
    let has = |list: &[String], word: &str| list.iter().any(|item| item == word);
    let candidates = || {
        sources.iter().filter(move |source| {
            has(&source.types, "deb")
                && has(&source.suites, suite)
                && has(&source.components, "main")
        })
    };
    let official = |source: &&AptSource| {
        source
            .signed_by
            .as_deref()
            .is_none_or(|keyring| keyring.contains("debian-archive-keyring"))
    };
    candidates()
        .filter(official)
        .chain(candidates().filter(|source| !official(source)))
        .find_map(|source| source.uris.iter().find(|uri| usable(uri)))
        .map(String::as_str)
}

fn usable(uri: &str) -> bool {
    DEBOOTSTRAP_SCHEMES
        .iter()
        .any(|scheme| uri.starts_with(scheme))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_SOURCES: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    fn source(uri: &str, suite: &str, components: &[&str], signed_by: Option<&str>) -> AptSource {
        AptSource {
            types: vec!["deb".to_owned()],
            uris: vec![uri.to_owned()],
            suites: vec![suite.to_owned()],
            components: components.iter().map(|c| (*c).to_owned()).collect(),
            signed_by: signed_by.map(str::to_owned),
        }
    }

    #[test]
    fn test_parse_deb822_two_stanzas_skip_comments() {
        let text = DEBIAN_SOURCES;

        let sources = parse_deb822(text);

        assert_eq!(
            sources,
            vec![
                AptSource {
                    types: vec!["deb".into()],
                    uris: vec!["http://deb.debian.org/debian".into()],
                    suites: vec!["bookworm".into(), "bookworm-updates".into()],
                    components: vec!["main".into()],
                    signed_by: Some("/usr/share/keyrings/debian-archive-keyring.gpg".into()),
                },
                AptSource {
                    types: vec!["deb".into()],
                    uris: vec!["http://deb.debian.org/debian-security".into()],
                    suites: vec!["bookworm-security".into()],
                    components: vec!["main".into()],
                    signed_by: Some("/usr/share/keyrings/debian-archive-keyring.gpg".into()),
                },
            ]
        );
    }

    #[test]
    fn test_parse_deb822_several_uris_and_continuation_lines_kept_in_order() {
        let text = "types: deb deb-src\nURIs: http://a.example/debian\n  http://b.example/debian\nSuites: bookworm\nComponents: main contrib\n";

        let sources = parse_deb822(text);

        assert_eq!(
            sources,
            vec![AptSource {
                types: vec!["deb".into(), "deb-src".into()],
                uris: vec![
                    "http://a.example/debian".into(),
                    "http://b.example/debian".into()
                ],
                suites: vec!["bookworm".into()],
                components: vec!["main".into(), "contrib".into()],
                signed_by: None,
            }]
        );
    }

    #[test]
    fn test_parse_deb822_disabled_stanza_dropped() {
        let text = "Enabled: no\nTypes: deb\nURIs: http://a.example/debian\nSuites: bookworm\nComponents: main\n";

        let sources = parse_deb822(text);

        assert!(sources.is_empty());
    }

    #[test]
    fn test_parse_deb822_commented_out_stanza_dropped() {
        let text = "# Types: deb\n# URIs: http://a.example/debian\n\n\n";

        let sources = parse_deb822(text);

        assert!(sources.is_empty());
    }

    #[test]
    fn test_parse_one_line_entries_with_options_and_comments() {
        let text = "\
# deb http://old.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/sdk.gpg] https://packages.cloud.google.com/apt cloud-sdk-bookworm main
deb http://deb.debian.org/debian bookworm main contrib # trailing comment
deb-src [ arch=amd64 ] http://deb.debian.org/debian bookworm main

not a source line
";

        let sources = parse_one_line(text);

        assert_eq!(
            sources,
            vec![
                source(
                    "https://packages.cloud.google.com/apt",
                    "cloud-sdk-bookworm",
                    &["main"],
                    Some("/usr/share/keyrings/sdk.gpg"),
                ),
                source(
                    "http://deb.debian.org/debian",
                    "bookworm",
                    &["main", "contrib"],
                    None
                ),
                AptSource {
                    types: vec!["deb-src".into()],
                    ..source("http://deb.debian.org/debian", "bookworm", &["main"], None)
                },
            ]
        );
    }

    #[test]
    fn test_parse_one_line_missing_suite_dropped() {
        let text = "deb http://deb.debian.org/debian\n";

        let sources = parse_one_line(text);

        assert!(sources.is_empty());
    }

    #[test]
    fn test_select_mirror_host_sources_picks_debian_over_security() {
        let sources = parse_deb822(DEBIAN_SOURCES);

        let mirror = select_mirror(&sources, "bookworm");

        assert_eq!(mirror, Some("http://deb.debian.org/debian"));
    }

    #[test]
    fn test_select_mirror_third_party_listed_first_loses_to_debian() {
        let sources = [
            source(
                "http://deb.debian.org/debian-security",
                "bookworm-security",
                &["main"],
                None,
            ),
            source(
                "https://packages.cloud.google.com/apt",
                "cloud-sdk-bookworm",
                &["main"],
                None,
            ),
            source(
                "https://packages.sury.org/php",
                "bookworm",
                &["main"],
                Some("/usr/share/keyrings/sury.gpg"),
            ),
            source(
                "http://deb.debian.org/debian",
                "bookworm",
                &["contrib"],
                None,
            ),
            source(
                "http://mirror.example/debian",
                "bookworm",
                &["main", "contrib"],
                None,
            ),
            source("http://deb.debian.org/debian", "bookworm", &["main"], None),
        ];

        let mirror = select_mirror(&sources, "bookworm");

        assert_eq!(mirror, Some("http://mirror.example/debian"));
    }

    #[test]
    fn test_select_mirror_deb_src_and_unusable_uris_skipped() {
        let sources = [
            AptSource {
                types: vec!["deb-src".into()],
                ..source("http://src.example/debian", "bookworm", &["main"], None)
            },
            AptSource {
                uris: vec![
                    "mirror+file:/etc/apt/mirrors.txt".into(),
                    "http://b.example/debian".into(),
                ],
                ..source("", "bookworm", &["main"], None)
            },
        ];

        let mirror = select_mirror(&sources, "bookworm");

        assert_eq!(mirror, Some("http://b.example/debian"));
    }

    #[test]
    fn test_select_mirror_no_bookworm_main_is_none() {
        let sources = [source(
            "http://deb.debian.org/debian",
            "trixie",
            &["main"],
            None,
        )];

        let mirror = select_mirror(&sources, "bookworm");

        assert_eq!(mirror, None);
    }

    #[test]
    fn test_select_mirror_only_third_party_is_taken() {
        let sources = [source(
            "https://packages.sury.org/php",
            "bookworm",
            &["main"],
            Some("/usr/share/keyrings/sury.gpg"),
        )];

        let mirror = select_mirror(&sources, "bookworm");

        assert_eq!(mirror, Some("https://packages.sury.org/php"));
    }
}
