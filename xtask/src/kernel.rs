//! `cargo xtask guest-kernel`: builds the guest kernel from Debian's `linux-source-6.1` with the
//! project's config fragment (`guest/kernel/hearth.config`) merged onto `make tinyconfig`, with
//! the project's patches (`guest/kernel/patches/*.patch`, in name order) applied to the source.
//!
//! Owns the kernel's cache entries (`<cache>/kernel/<hash>/{vmlinux,bzImage,.config}`, keyed by the
//! fragment, the patches, the source package version and [`RECIPE_VERSION`]), the extracted and
//! patched source trees they are built from (`<cache>/linux-source-<version>-<patches>/`), and
//! the checks a built kernel must pass:
//! every option of the fragment has its requested value in the final `.config`, and `vmlinux`
//! carries the PVH entry note. Entries are published by a rename, so one is absent or complete.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util;

/// Bump when the build steps change in a way that changes the kernel (it is part of the key).
const RECIPE_VERSION: &str = "2";
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The directory the tarball unpacks to.
const SOURCE_TOP_DIR: &str = "linux-source-6.1";
/// The fragment, relative to the workspace root.
const FRAGMENT: &str = "guest/kernel/hearth.config";
/// The directory of patches to the source (`*.patch`, applied with `patch -p1` in name order),
/// relative to the workspace root.
const PATCHES: &str = "guest/kernel/patches";
const ARCH: &str = "x86_64";
/// Prefix of the scratch directories this task makes in the cache (see [`ScratchDir`]).
const SCRATCH_PREFIX: &str = ".guest-kernel-";

/// Builds (or finds in the cache) the guest kernel and returns the path of its `vmlinux`.
pub fn build() -> Result<PathBuf> {
    build_entry().map(|entry| entry.join("vmlinux"))
}

/// The same kernel as [`build`], as a compressed bzImage (the Linux boot protocol's format).
pub fn bzimage() -> Result<PathBuf> {
    build_entry().map(|entry| entry.join("bzImage"))
}

/// Builds (or finds in the cache) the guest kernel and returns its cache entry.
fn build_entry() -> Result<PathBuf> {
    let fragment_path = util::workspace_root().join(FRAGMENT);
    let fragment =
        fs::read(&fragment_path).with_context(|| format!("read {}", fragment_path.display()))?;
    let source_version = util::deb_version(SOURCE_PACKAGE)?;
    let patches = read_patches(&util::workspace_root().join(PATCHES))?;
    let key = cache_key(&fragment, &patches, &source_version);
    let kernel_dir = util::cache_dir().join("kernel");
    let entry = kernel_dir.join(&key);
    let vmlinux = entry.join("vmlinux");
    if vmlinux.is_file() {
        eprintln!("guest-kernel: cached ({key})");
        return Ok(entry);
    }

    let wanted = std::str::from_utf8(&fragment)
        .context("the fragment is not UTF-8")
        .and_then(parse_config)
        .with_context(|| format!("parse {}", fragment_path.display()))?;
    let source = ensure_source(&source_version, &patches)?;
    fs::create_dir_all(&kernel_dir).with_context(|| format!("create {}", kernel_dir.display()))?;
    remove_stale_scratch(&kernel_dir)?;

    let build = ScratchDir::create(&kernel_dir, "build")?;
    configure(&source, build.path(), &fragment_path)?;
    check_config(&build.path().join(".config"), &wanted)?;
    compile(&source, build.path())?;
    let built = build.path().join("vmlinux");
    check_pvh_note(&built)?;

    let stage = ScratchDir::create(&kernel_dir, "entry")?;
    fs::rename(&built, stage.path().join("vmlinux")).context("move vmlinux to the new entry")?;
    fs::rename(
        build.path().join("arch/x86/boot/bzImage"),
        stage.path().join("bzImage"),
    )
    .context("move bzImage to the new entry")?;
    fs::copy(build.path().join(".config"), stage.path().join(".config"))
        .context("copy .config to the new entry")?;
    if !vmlinux.is_file() {
        util::publish_dir(stage.path(), &entry)?;
    }
    remove_other_sources(&util::cache_dir(), &source)?;
    Ok(entry)
}

/// Removes the source trees in `cache` other than `keep` (1.5 GB each): older patch series or
/// package versions. A later build that needs one again extracts it afresh.
fn remove_other_sources(cache: &Path, keep: &Path) -> Result<()> {
    let entries = fs::read_dir(cache).with_context(|| format!("list {}", cache.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_source = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with("linux-source-"));
        if !is_source || path == keep || !path.is_dir() {
            continue;
        }
        eprintln!(
            "guest-kernel: removing the unused source tree {}",
            path.display()
        );
        fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

/// A patch to the kernel source: its file name, where it is, and its contents.
struct Patch {
    name: String,
    path: PathBuf,
    text: Vec<u8>,
}

/// The `*.patch` files of `dir`, in name order (none if `dir` does not exist).
fn read_patches(dir: &Path) -> Result<Vec<Patch>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("read {}", dir.display())),
    };
    let mut patches = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("read {}", dir.display()))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".patch") {
            continue;
        }
        let text = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        patches.push(Patch {
            name: name.to_owned(),
            path: path.clone(),
            text,
        });
    }
    patches.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(patches)
}

/// The content hash of a patch series: names and contents, in order.
fn patches_hash(patches: &[Patch]) -> String {
    let parts: Vec<(&str, &[u8])> = patches
        .iter()
        .map(|p| (p.name.as_str(), p.text.as_slice()))
        .collect();
    util::content_hash(&parts)
}

/// The cache key of a kernel built from `fragment`, `patches` and source package
/// `source_version`.
fn cache_key(fragment: &[u8], patches: &[Patch], source_version: &str) -> String {
    util::content_hash(&[
        ("recipe", RECIPE_VERSION.as_bytes()),
        ("source", source_version.as_bytes()),
        ("fragment", fragment),
        ("patches", patches_hash(patches).as_bytes()),
    ])
}

/// The source tree of `linux-source-6.1` at `version` with `patches` applied, extracted and
/// patched into the cache on first use. It is only read afterwards: kernels are built out of
/// tree.
fn ensure_source(version: &str, patches: &[Patch]) -> Result<PathBuf> {
    let cache = util::cache_dir();
    let series = patches_hash(patches);
    let dest = cache.join(format!("linux-source-{version}-{}", &series[..12]));
    if dest.is_dir() {
        return Ok(dest);
    }
    fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    remove_stale_scratch(&cache)?;
    let scratch = ScratchDir::create(&cache, "source")?;
    eprintln!(
        "guest-kernel: extracting {SOURCE_TARBALL} to {}",
        dest.display()
    );
    util::run(
        Command::new("tar")
            .arg("-xf")
            .arg(SOURCE_TARBALL)
            .arg("-C")
            .arg(scratch.path()),
    )?;
    let tree = scratch.path().join(SOURCE_TOP_DIR);
    for patch in patches {
        eprintln!("guest-kernel: applying {}", patch.name);
        util::run(
            Command::new("patch")
                .args(["-p1", "--batch", "--forward", "--silent", "-d"])
                .arg(&tree)
                .arg("-i")
                .arg(&patch.path),
        )
        .with_context(|| {
            format!(
                "{} does not apply to {SOURCE_PACKAGE} {version}",
                patch.name
            )
        })?;
    }
    match fs::rename(&tree, &dest) {
        Ok(()) => Ok(dest),
        // Another run extracted the same version meanwhile; its tree is as good as ours.
        Err(_) if dest.is_dir() => Ok(dest),
        Err(err) => {
            Err(err).with_context(|| format!("rename the source tree to {}", dest.display()))
        }
    }
}

/// A `make` in the kernel tree `source` building into `build`, its output sent to stderr.
fn make(source: &Path, build: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(source)
        .arg(format!("O={}", build.display()))
        .arg(format!("ARCH={ARCH}"))
        .stdout(std::io::stderr());
    cmd
}

/// Writes `build/.config`: `tinyconfig`, the fragment merged on top, then the remaining
/// options at their defaults.
fn configure(source: &Path, build: &Path, fragment: &Path) -> Result<()> {
    eprintln!(
        "guest-kernel: configuring tinyconfig + {}",
        fragment.display()
    );
    util::run(make(source, build).arg("tinyconfig"))?;
    util::run(
        Command::new(source.join("scripts/kconfig/merge_config.sh"))
            .arg("-m")
            .arg("-O")
            .arg(build)
            .arg(build.join(".config"))
            .arg(fragment)
            .current_dir(source)
            .stdout(std::io::stderr()),
    )?;
    util::run(make(source, build).arg("olddefconfig"))
}

/// Fails, listing them, unless every option of `wanted` has its value in the `.config` at
/// `config`. Kconfig drops an option whose dependencies are off without a word.
fn check_config(config: &Path, wanted: &BTreeMap<String, String>) -> Result<()> {
    let text = fs::read_to_string(config).with_context(|| format!("read {}", config.display()))?;
    let actual = parse_config(&text).with_context(|| format!("parse {}", config.display()))?;
    let missing = mismatches(wanted, &actual);
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing.iter().map(|m| format!("  {m}")).collect();
    bail!(
        "the kernel configuration differs from {FRAGMENT} in {} option(s) (Kconfig silently \
         drops an option whose dependencies are off, and turns on one that another selects or \
         that defaults to on; fix the fragment):\n{}",
        missing.len(),
        list.join("\n")
    )
}

/// Runs `make vmlinux bzImage` with one job per CPU and reports how long it took.
fn compile(source: &Path, build: &Path) -> Result<()> {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "guest-kernel: building vmlinux and bzImage (make -j{jobs}) in {}",
        build.display()
    );
    let started = Instant::now();
    util::run(
        make(source, build)
            .arg(format!("-j{jobs}"))
            .args(["vmlinux", "bzImage"]),
    )?;
    eprintln!(
        "guest-kernel: built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Fails unless `vmlinux` has the Xen `PHYS32_ENTRY` note a VMM boots it through (PVH).
fn check_pvh_note(vmlinux: &Path) -> Result<()> {
    let notes = util::output(Command::new("readelf").arg("-n").arg(vmlinux))?;
    if !has_pvh_note(&notes) {
        bail!(
            "{} has no Xen PHYS32_ENTRY note, so it cannot boot through PVH",
            vmlinux.display()
        );
    }
    Ok(())
}

/// Whether `readelf -n` output lists a note of owner `Xen` and type `XEN_ELFNOTE_PHYS32_ENTRY`
/// (18), which readelf names or prints as a number depending on its version.
fn has_pvh_note(readelf_notes: &str) -> bool {
    readelf_notes.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("Xen")
            && (line.contains("PHYS32_ENTRY") || line.contains("(0x00000012)"))
    })
}

/// Options as a `.config` or a fragment spells them: `CONFIG_NAME` to `y`, `m`, a number or a
/// quoted string, and to `n` for `# CONFIG_NAME is not set`. Other comments and blank lines
/// are skipped; any other line, or an option given two different values, is an error.
fn parse_config(text: &str) -> Result<BTreeMap<String, String>> {
    let mut options = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let Some((name, value)) = parse_config_line(line.trim()) else {
            bail!(
                "line {}: expected `CONFIG_NAME=value` or `# CONFIG_NAME is not set`, found `{}`",
                index + 1,
                line.trim()
            );
        };
        if name.is_empty() {
            continue;
        }
        if let Some(previous) = options.insert(name.to_owned(), value.to_owned()) {
            if previous != value {
                bail!(
                    "line {}: {name} is set to {value} after {previous}",
                    index + 1
                );
            }
        }
    }
    Ok(options)
}

/// One trimmed line: `Some((name, value))` for an option, `Some(("", ""))` for a line to skip,
/// `None` for a malformed line.
fn parse_config_line(line: &str) -> Option<(&str, &str)> {
    if let Some(comment) = line.strip_prefix('#') {
        let unset = comment
            .trim()
            .strip_suffix(" is not set")
            .filter(|name| is_option_name(name));
        return Some(unset.map_or(("", ""), |name| (name, "n")));
    }
    if line.is_empty() {
        return Some(("", ""));
    }
    let (name, value) = line.split_once('=')?;
    (is_option_name(name) && !value.is_empty()).then_some((name, value))
}

fn is_option_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// An option of the fragment that the final `.config` does not have as requested.
#[derive(Debug, PartialEq, Eq)]
struct Mismatch {
    name: String,
    wanted: String,
    /// The value in the `.config`; `None` when it does not mention the option.
    found: Option<String>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let found = match self.found.as_deref() {
            None | Some("n") => "not set",
            Some(value) => value,
        };
        write!(f, "{}={} (is: {found})", self.name, self.wanted)
    }
}

/// The options of `wanted` whose value in `actual` differs; an option wanted `n` may also be
/// absent.
fn mismatches(
    wanted: &BTreeMap<String, String>,
    actual: &BTreeMap<String, String>,
) -> Vec<Mismatch> {
    wanted
        .iter()
        .filter(|(name, value)| {
            let found = actual.get(*name).map_or("n", String::as_str);
            found != value.as_str()
        })
        .map(|(name, value)| Mismatch {
            name: name.clone(),
            wanted: value.clone(),
            found: actual.get(name).cloned(),
        })
        .collect()
}

/// A directory in the cache for work in progress, removed when dropped. Its name carries the
/// owning process id, so a later run can remove what a killed run left behind.
#[derive(Debug)]
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn create(parent: &Path, purpose: &str) -> Result<Self> {
        let path = parent.join(scratch_name(purpose, std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Absent once published; otherwise best effort, a later run retries.
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn scratch_name(purpose: &str, pid: u32) -> String {
    format!("{SCRATCH_PREFIX}{purpose}.{pid}")
}

/// The process that owns the scratch directory named `name`, or `None` if it is not one.
fn scratch_owner(name: &str) -> Option<u32> {
    let (_, pid) = name.strip_prefix(SCRATCH_PREFIX)?.rsplit_once('.')?;
    pid.parse().ok()
}

/// Removes the scratch directories in `dir` whose owning process is gone.
fn remove_stale_scratch(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))?;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(scratch_owner) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        eprintln!(
            "guest-kernel: removing {} left by an earlier run",
            path.display()
        );
        fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn test_parse_config_values_and_unset_options_are_read() {
        let text =
            "CONFIG_PVH=y\nCONFIG_NR_CPUS=64\nCONFIG_CMDLINE=\"a b\"\n# CONFIG_PCI is not set\n";

        let parsed = parse_config(text).expect("the text is well formed");

        let expected = options(&[
            ("CONFIG_PVH", "y"),
            ("CONFIG_NR_CPUS", "64"),
            ("CONFIG_CMDLINE", "\"a b\""),
            ("CONFIG_PCI", "n"),
        ]);
        assert_eq!(parsed, expected);
    }

    #[test]
    fn test_parse_config_comments_and_blank_lines_are_skipped() {
        let text = "#\n# Automatically generated file; DO NOT EDIT.\n\n  # --- Section ---\n";

        let parsed = parse_config(text).expect("the text is well formed");

        assert!(parsed.is_empty());
    }

    #[test]
    fn test_parse_config_line_without_value_is_an_error() {
        let text = "CONFIG_PVH=y\nCONFIG_SMP\n";

        let err = parse_config(text).expect_err("the text is malformed");

        assert!(err.to_string().starts_with("line 2:"), "{err}");
    }

    #[test]
    fn test_parse_config_name_without_prefix_is_an_error() {
        let text = "PVH=y\n";

        let result = parse_config(text);

        assert!(result.is_err());
    }

    #[test]
    fn test_parse_config_conflicting_values_are_an_error() {
        let text = "CONFIG_SMP=y\n# CONFIG_SMP is not set\n";

        let err = parse_config(text).expect_err("the text is malformed");

        assert!(err.to_string().contains("CONFIG_SMP"), "{err}");
    }

    #[test]
    fn test_parse_config_project_fragment_forbids_modules_and_wants_pvh() {
        let fragment = include_str!("../../guest/kernel/hearth.config");

        let parsed = parse_config(fragment).expect("the fragment is well formed");

        assert_eq!(parsed["CONFIG_MODULES"], "n");
        assert_eq!(parsed["CONFIG_PVH"], "y");
    }

    #[test]
    fn test_mismatches_all_present_is_empty() {
        let wanted = options(&[("CONFIG_PVH", "y"), ("CONFIG_NR_CPUS", "64")]);
        let actual = options(&[
            ("CONFIG_PVH", "y"),
            ("CONFIG_NR_CPUS", "64"),
            ("CONFIG_X", "y"),
        ]);

        let found = mismatches(&wanted, &actual);

        assert!(found.is_empty());
    }

    #[test]
    fn test_mismatches_dropped_option_is_reported() {
        let wanted = options(&[("CONFIG_PVH", "y"), ("CONFIG_VIRTIO_BLK", "y")]);
        let actual = options(&[("CONFIG_PVH", "y")]);

        let found = mismatches(&wanted, &actual);

        let expected = vec![Mismatch {
            name: "CONFIG_VIRTIO_BLK".to_owned(),
            wanted: "y".to_owned(),
            found: None,
        }];
        assert_eq!(found, expected);
    }

    #[test]
    fn test_mismatches_other_number_is_reported() {
        let wanted = options(&[("CONFIG_NR_CPUS", "64")]);
        let actual = options(&[("CONFIG_NR_CPUS", "8")]);

        let found = mismatches(&wanted, &actual);

        assert_eq!(found.len(), 1);
        assert_eq!(found[0].found.as_deref(), Some("8"));
    }

    #[test]
    fn test_mismatches_unset_wanted_and_absent_is_satisfied() {
        let wanted = options(&[("CONFIG_MODULES", "n"), ("CONFIG_PCI", "n")]);
        let actual = options(&[("CONFIG_PCI", "n")]);

        let found = mismatches(&wanted, &actual);

        assert!(found.is_empty());
    }

    #[test]
    fn test_mismatches_unset_wanted_but_enabled_is_reported() {
        let wanted = options(&[("CONFIG_MODULES", "n")]);
        let actual = options(&[("CONFIG_MODULES", "y")]);

        let found = mismatches(&wanted, &actual);

        assert_eq!(found.len(), 1);
    }

    #[test]
    fn test_mismatch_display_absent_reads_not_set() {
        let mismatch = Mismatch {
            name: "CONFIG_VIRTIO_BLK".to_owned(),
            wanted: "y".to_owned(),
            found: None,
        };

        let text = mismatch.to_string();

        assert_eq!(text, "CONFIG_VIRTIO_BLK=y (is: not set)");
    }

    #[test]
    fn test_has_pvh_note_named_type_is_found() {
        let notes = "Displaying notes found in: .note.Xen\n  Owner  Data size  Description\n  \
                     Xen                  0x00000008\tNT_XEN_PHYS32_ENTRY\n";

        let found = has_pvh_note(notes);

        assert!(found);
    }

    #[test]
    fn test_has_pvh_note_numbered_type_is_found() {
        let notes = "  Xen                  0x00000008\tUnknown note type: (0x00000012)\n";

        let found = has_pvh_note(notes);

        assert!(found);
    }

    #[test]
    fn test_has_pvh_note_other_notes_are_not_enough() {
        let notes =
            "  GNU                  0x00000014\tNT_GNU_BUILD_ID (unique build ID bitstring)\n  \
                     Linux                0x00000004\tUnknown note type: (0x00000012)\n";

        let found = has_pvh_note(notes);

        assert!(!found);
    }

    #[test]
    fn test_cache_key_fragment_change_changes_key() {
        let before = cache_key(b"CONFIG_SMP=y\n", &[], "6.1.192-3");

        let after = cache_key(b"CONFIG_SMP=y\nCONFIG_PVH=y\n", &[], "6.1.192-3");

        assert_ne!(before, after);
    }

    #[test]
    fn test_cache_key_source_version_change_changes_key() {
        let before = cache_key(b"CONFIG_SMP=y\n", &[], "6.1.192-3");

        let after = cache_key(b"CONFIG_SMP=y\n", &[], "6.1.193-1");

        assert_ne!(before, after);
    }

    fn patch(name: &str, text: &str) -> Patch {
        Patch {
            name: name.to_owned(),
            path: PathBuf::from(name),
            text: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn test_cache_key_patch_change_changes_key() {
        let before = cache_key(b"CONFIG_SMP=y\n", &[patch("0001.patch", "a")], "6.1.192-3");

        let after = cache_key(b"CONFIG_SMP=y\n", &[patch("0001.patch", "b")], "6.1.192-3");

        assert_ne!(before, after);
    }

    #[test]
    fn test_read_patches_takes_patch_files_in_name_order() {
        let dir = std::env::temp_dir().join(format!("hearth-patches-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("0002-b.patch"), "b").unwrap();
        fs::write(dir.join("0001-a.patch"), "a").unwrap();
        fs::write(dir.join("README"), "not a patch").unwrap();

        let patches = read_patches(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();

        let names: Vec<&str> = patches.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["0001-a.patch", "0002-b.patch"]);
    }

    #[test]
    fn test_read_patches_missing_directory_is_empty() {
        let patches = read_patches(Path::new("/nonexistent/hearth-patches")).unwrap();

        assert!(patches.is_empty());
    }

    #[test]
    fn test_project_patches_start_with_a_description() {
        let patches = read_patches(&util::workspace_root().join(PATCHES)).unwrap();

        for p in &patches {
            let text = std::str::from_utf8(&p.text).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            let diff_start = lines.iter().position(|l| l.starts_with("--- a/"));
            let diff_start = diff_start.unwrap_or_else(|| panic!("{} has no diff", p.name));
            assert!(
                lines[..diff_start].iter().any(|l| !l.trim().is_empty()),
                "{} has no description",
                p.name
            );
        }
    }

    #[test]
    fn test_scratch_owner_own_name_gives_pid() {
        let name = scratch_name("build", 4242);

        let owner = scratch_owner(&name);

        assert_eq!(owner, Some(4242));
    }

    #[test]
    fn test_scratch_owner_foreign_name_is_none() {
        let names = [
            "linux-source-6.1.192-3",
            ".rootfs-build.17",
            ".guest-kernel-build",
        ];

        let owners: Vec<Option<u32>> = names.iter().map(|name| scratch_owner(name)).collect();

        assert_eq!(owners, vec![None, None, None]);
    }
}
