//! Reading a policy from disk: a directory tree of `.rego` modules and `data.json` documents,
//! OPA's layout (a `data.json` in `a/b/` is the document at `data.a.b`). The revision names the
//! exact content loaded, so that a decision log can say which policy decided.

use crate::PolicyError;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// The files of one policy revision, read but not yet compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Sources {
    /// `(path as shown in errors, Rego text)`, in path order.
    pub modules: Vec<(String, String)>,
    /// The merged data document.
    pub data: serde_json::Value,
    /// A digest of everything read (`sha-` … for a directory), or a bundle's manifest revision.
    pub revision: String,
}

/// Reads a policy directory. Hidden entries (`.git`, editors' swap files) are skipped.
pub fn load(path: &Path) -> Result<Sources, PolicyError> {
    let io = |p: &Path| {
        let shown = p.display().to_string();
        move |source| PolicyError::Io {
            path: shown,
            source,
        }
    };
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_dir() {
        return Err(PolicyError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other("not a directory of .rego files"),
        });
    }
    let mut files = Vec::new();
    walk(path, &mut files).map_err(io(path))?;
    files.sort();
    let mut modules = Vec::new();
    let mut data = serde_json::Value::Object(Default::default());
    let mut digest = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        let rel = f.strip_prefix(path).unwrap_or(&f).to_path_buf();
        let shown = f.display().to_string();
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".rego") {
            let text = std::fs::read_to_string(&f).map_err(io(&f))?;
            rel.hash(&mut digest);
            text.hash(&mut digest);
            modules.push((shown, text));
        } else if name == "data.json" {
            let text = std::fs::read_to_string(&f).map_err(io(&f))?;
            rel.hash(&mut digest);
            text.hash(&mut digest);
            let doc: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| PolicyError::Data {
                    path: shown.clone(),
                    message: e.to_string(),
                })?;
            let at: Vec<String> = rel
                .parent()
                .map(|p| {
                    p.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            merge_at(&mut data, &at, doc).map_err(|message| PolicyError::Data {
                path: shown,
                message,
            })?;
        }
    }
    if modules.is_empty() {
        return Err(PolicyError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(Sources {
        modules,
        data,
        revision: format!("sha-{:016x}", digest.finish()),
    })
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let p = entry.path();
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

    #[test]
    fn data_documents_merge_at_their_directory() {
        let mut data = json!({});
        merge_at(&mut data, &[], json!({"a": {"x": 1}})).unwrap();
        merge_at(&mut data, &["a".into(), "b".into()], json!({"y": 2})).unwrap();
        assert_eq!(data, json!({"a": {"x": 1, "b": {"y": 2}}}));
        let err = merge_at(&mut data, &["a".into()], json!({"x": 3})).unwrap_err();
        assert!(err.contains("data.a.x"), "{err}");
    }
}
