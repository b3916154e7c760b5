//! Reading a policy from disk, as OPA reads one: a directory tree of `.rego` modules and
//! `data.json` documents (a `data.json` in `a/b/` is the document at `data.a.b`), or an OPA
//! bundle, a `.tar.gz` of the same tree with a `.manifest` naming its revision. The revision
//! names the exact content loaded, so that a decision log can say which policy decided.

use crate::PolicyError;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest bundle file, and largest total of its unpacked files, that is read.
const BUNDLE_LIMIT: u64 = 64 * 1024 * 1024;

/// The files of one policy revision, read but not yet compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Sources {
    /// `(path as shown in errors, Rego text)`, in path order.
    pub modules: Vec<(String, String)>,
    /// The merged data document.
    pub data: serde_json::Value,
    /// A bundle's manifest revision, or a digest of everything read (`sha-…`).
    pub revision: String,
}

/// Reads a policy directory or an OPA bundle (`.tar.gz`, `.tgz`). Hidden entries (`.git`,
/// editors' swap files) are skipped.
pub fn load(path: &Path) -> Result<Sources, PolicyError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mut b = Builder::default();
    if meta.is_dir() {
        let mut files = Vec::new();
        walk(path, &mut files).map_err(io(path))?;
        for f in files {
            let rel = f.strip_prefix(path).unwrap_or(&f).to_path_buf();
            if wanted(&rel) {
                let bytes = std::fs::read(&f).map_err(io(&f))?;
                b.add(&rel, &f.display().to_string(), bytes)?;
            }
        }
    } else {
        read_bundle(path, &mut b)?;
    }
    b.finish(path)
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> PolicyError {
    let shown = p.display().to_string();
    move |source| PolicyError::Io {
        path: shown.clone(),
        source,
    }
}

/// `.rego` modules, `data.json` documents and a bundle's `.manifest`.
fn wanted(rel: &Path) -> bool {
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".rego") || name == "data.json" || rel == Path::new(".manifest")
}

fn read_bundle(path: &Path, b: &mut Builder) -> Result<(), PolicyError> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let gz = flate2::read::GzDecoder::new(file.take(BUNDLE_LIMIT));
    let mut archive = tar::Archive::new(gz);
    let shown = path.display().to_string();
    let bad = |e: std::io::Error| PolicyError::Io {
        path: shown.clone(),
        source: std::io::Error::new(e.kind(), format!("not a readable .tar.gz bundle: {e}")),
    };
    let mut total = 0u64;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        // Bundles are often built with a leading `/` or `./`; paths never leave the bundle.
        let raw = entry.path().map_err(bad)?.into_owned();
        let rel: PathBuf = raw
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect();
        if !wanted(&rel) {
            continue;
        }
        total += entry.size();
        if total > BUNDLE_LIMIT {
            return Err(bad(std::io::Error::other("unpacks to more than 64 MiB")));
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(bad)?;
        b.add(&rel, &format!("{shown}:/{}", rel.display()), bytes)?;
    }
    Ok(())
}

#[derive(Default)]
struct Builder {
    modules: Vec<(String, String)>,
    data: serde_json::Map<String, serde_json::Value>,
    digest: std::collections::hash_map::DefaultHasher,
    manifest_revision: Option<String>,
}

impl Builder {
    /// One file, by its path inside the policy (`rel`) and as errors show it (`shown`).
    fn add(&mut self, rel: &Path, shown: &str, bytes: Vec<u8>) -> Result<(), PolicyError> {
        let text = String::from_utf8(bytes).map_err(|_| PolicyError::Data {
            path: shown.to_string(),
            message: "not UTF-8 text".into(),
        })?;
        rel.hash(&mut self.digest);
        text.hash(&mut self.digest);
        let json = |text: &str| {
            serde_json::from_str::<serde_json::Value>(text).map_err(|e| PolicyError::Data {
                path: shown.to_string(),
                message: e.to_string(),
            })
        };
        if rel == Path::new(".manifest") {
            let m = json(&text)?;
            self.manifest_revision = m.get("revision").and_then(|r| match r {
                serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
                _ => None,
            });
        } else if rel.extension().is_some_and(|e| e == "rego") {
            self.modules.push((shown.to_string(), text));
        } else {
            let at: Vec<String> = rel
                .parent()
                .map(|p| {
                    p.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            let mut data = serde_json::Value::Object(std::mem::take(&mut self.data));
            let merged = merge_at(&mut data, &at, json(&text)?);
            if let serde_json::Value::Object(m) = data {
                self.data = m;
            }
            merged.map_err(|message| PolicyError::Data {
                path: shown.to_string(),
                message,
            })?;
        }
        Ok(())
    }

    fn finish(mut self, path: &Path) -> Result<Sources, PolicyError> {
        if self.modules.is_empty() {
            return Err(PolicyError::Empty {
                path: path.display().to_string(),
            });
        }
        self.modules.sort();
        Ok(Sources {
            modules: self.modules,
            data: serde_json::Value::Object(self.data),
            revision: self
                .manifest_revision
                .unwrap_or_else(|| format!("sha-{:016x}", self.digest.finish())),
        })
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let p = entry.path();
        if name.to_string_lossy().starts_with('.') && name != ".manifest" {
            continue;
        }
        if entry.file_type()?.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Puts `doc` at `path` inside `data`, merging objects; two documents giving the same key
/// different non-object values is an error, as in OPA.
pub(crate) fn merge_at(
    data: &mut serde_json::Value,
    path: &[String],
    doc: serde_json::Value,
) -> Result<(), String> {
    let mut node = data;
    for key in path {
        let obj = node
            .as_object_mut()
            .ok_or_else(|| format!("`{key}` is both a value and a directory"))?;
        node = obj
            .entry(key.clone())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
    merge(node, doc, &path.join("."))
}

fn merge(into: &mut serde_json::Value, doc: serde_json::Value, at: &str) -> Result<(), String> {
    match (into, doc) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v, &format!("{at}.{k}"))?,
                    None => {
                        a.insert(k, v);
                    }
                }
            }
            Ok(())
        }
        (a, b) if *a == b => Ok(()),
        _ => Err(format!("data.{at} is defined twice with different values")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agentmesh-load-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes a gzipped tarball of `(path, content)` entries, paths as given.
    fn bundle(path: &Path, files: &[(&str, &str)]) {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(path).unwrap(),
            flate2::Compression::default(),
        );
        let mut t = tar::Builder::new(gz);
        for (name, text) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(text.len() as u64);
            h.set_mode(0o644);
            // Raw name bytes: `opa build` writes absolute names (`/.manifest`), which the tar
            // crate's path setters refuse.
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            t.append(&h, text.as_bytes()).unwrap();
        }
        t.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn data_documents_merge_at_their_directory() {
        let mut data = json!({});
        merge_at(&mut data, &[], json!({"a": {"x": 1}})).unwrap();
        merge_at(&mut data, &["a".into(), "b".into()], json!({"y": 2})).unwrap();
        assert_eq!(data, json!({"a": {"x": 1, "b": {"y": 2}}}));
        let err = merge_at(&mut data, &["a".into()], json!({"x": 3})).unwrap_err();
        assert!(err.contains("data.a.x"), "{err}");
    }

    #[test]
    fn a_directory_and_the_same_files_as_a_bundle_load_alike() {
        let d = scratch("dir");
        std::fs::create_dir_all(d.join("teams/search")).unwrap();
        std::fs::write(d.join("p.rego"), "package p\nx := 1\n").unwrap();
        std::fs::write(d.join("teams/search/data.json"), r#"{"budget": 5}"#).unwrap();
        std::fs::write(d.join(".swap.rego"), "not rego").unwrap();
        let from_dir = load(&d).unwrap();
        assert_eq!(from_dir.modules.len(), 1);
        assert_eq!(from_dir.data, json!({"teams": {"search": {"budget": 5}}}));
        assert!(from_dir.revision.starts_with("sha-"));

        let b = d.join("bundle.tar.gz");
        bundle(
            &b,
            &[
                (
                    "/.manifest",
                    r#"{"revision": "2026-12-01.3", "roots": ["agentmesh"]}"#,
                ),
                ("./p.rego", "package p\nx := 1\n"),
                ("teams/search/data.json", r#"{"budget": 5}"#),
                ("README.md", "ignored"),
            ],
        );
        let from_bundle = load(&b).unwrap();
        assert_eq!(from_bundle.data, from_dir.data);
        assert_eq!(from_bundle.revision, "2026-12-01.3");
        assert_eq!(from_bundle.modules[0].1, "package p\nx := 1\n");
        assert!(
            from_bundle.modules[0].0.ends_with("bundle.tar.gz:/p.rego"),
            "{}",
            from_bundle.modules[0].0
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn broken_bundles_are_clear_errors() {
        let d = scratch("bad");
        let b = d.join("b.tar.gz");
        std::fs::write(&b, b"not gzip at all").unwrap();
        let e = load(&b).unwrap_err().to_string();
        assert!(e.contains("not a readable .tar.gz bundle"), "{e}");
        bundle(&b, &[("data.json", "{}")]);
        assert!(matches!(load(&b), Err(PolicyError::Empty { .. })));
        bundle(&b, &[("p.rego", "package p"), ("data.json", "{oops")]);
        let e = load(&b).unwrap_err().to_string();
        assert!(
            e.contains("b.tar.gz:/data.json") && e.contains("invalid data"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
