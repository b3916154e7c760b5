//! The error of a YAML file the mesh reads (the sidecar's bootstrap config, the control server's
//! declarations, an agent's manifest): the file, and what is wrong with it, down to the field
//! and, for a parse error, the line and column.

/// A YAML file that could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FileError {
    #[error("{file}: cannot read: {message}")]
    Read { file: String, message: String },
    /// Not YAML, or not of the expected shape: serde_yaml's message names the field path and
    /// the line and column.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// A value that breaks a rule the types alone cannot state.
    #[error("{file}: field `{field}`: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

impl FileError {
    /// The file (or directory) could not be read.
    pub fn read(file: &str, e: impl std::fmt::Display) -> FileError {
        FileError::Read {
            file: file.to_string(),
            message: e.to_string(),
        }
    }

    /// `field` of `file` breaks a rule.
    pub fn invalid(file: &str, field: String, message: String) -> FileError {
        FileError::Invalid {
            file: file.to_string(),
            field,
            message,
        }
    }
}

/// The typed value of the YAML `text` of `file`.
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T, FileError> {
    serde_yaml::from_str(text).map_err(|e| FileError::Parse {
        file: file.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        port: u16,
    }

    #[test]
    fn each_error_names_its_file_and_what_is_wrong() {
        let e = from_yaml::<Doc>("name: a\nport: high\n", "boot.yaml").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("boot.yaml: port: invalid type"), "{text}");
        assert!(text.contains("line 2 column 7"), "{text}");
        assert!(from_yaml::<Doc>("name: a\nport: 80\n", "boot.yaml").is_ok());
        let e = FileError::invalid("boot.yaml", "port".into(), "must not be 0".into());
        assert_eq!(e.to_string(), "boot.yaml: field `port`: must not be 0");
        let io = std::fs::read_to_string("/nonexistent/boot.yaml").unwrap_err();
        let e = FileError::read("/nonexistent/boot.yaml", io);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/boot.yaml: cannot read: No such file"),
            "{e}"
        );
    }
}
