//! The handler configuration: `MODULE:FUNCTION`, then optionally whitespace
//! and the rest, which goes to the module's `gaspard_init` as it is.

/// Why a handler configuration names no Python function.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(
        "no Python function named: give --handler-config 'MODULE:FUNCTION' (e.g. 'myapp.handlers:resize')"
    )]
    Empty,
    #[error(
        "handler config {0:?} does not start with MODULE:FUNCTION (e.g. 'myapp.handlers:resize')"
    )]
    Malformed(String),
}

/// What the handler configuration names.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// A dotted module name, imported with `importlib.import_module`.
    pub module: String,
    /// An attribute path in that module: `resize`, or `Resizer.handle`.
    pub function: Vec<String>,
    /// What follows the first word, leading whitespace removed: the
    /// argument of `gaspard_init`.
    pub rest: String,
}

impl Target {
    /// Parses `MODULE:FUNCTION[ REST]`.
    pub fn parse(config: &str) -> Result<Target, TargetError> {
        let config = config.trim_start();
        if config.is_empty() {
            return Err(TargetError::Empty);
        }
        let (word, rest) = config
            .split_once(char::is_whitespace)
            .unwrap_or((config, ""));
        let malformed = || TargetError::Malformed(word.to_string());
        let (module, function) = word.split_once(':').ok_or_else(malformed)?;
        let dotted = |text: &str| !text.is_empty() && text.split('.').all(is_identifier);
        if !dotted(module) || !dotted(function) {
            return Err(malformed());
        }
        Ok(Target {
            module: module.to_string(),
            function: function.split('.').map(str::to_string).collect(),
            rest: rest.trim_start().to_string(),
        })
    }

    /// `MODULE:FUNCTION`, for messages.
    pub fn name(&self) -> String {
        format!("{}:{}", self.module, self.function.join("."))
    }
}

/// A Python identifier, as far as a name given on a command line needs:
/// a letter or underscore, then letters, digits or underscores (Unicode
/// letters included, as Python allows).
fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_and_a_function() {
        let target = Target::parse("myapp.handlers:resize").unwrap();
        assert_eq!(target.module, "myapp.handlers");
        assert_eq!(target.function, ["resize"]);
        assert_eq!(target.rest, "");
        assert_eq!(target.name(), "myapp.handlers:resize");
    }

    #[test]
    fn the_rest_goes_to_the_init_hook_as_it_is() {
        let target = Target::parse("app:Handler.handle   db=/srv/db  size=3 ").unwrap();
        assert_eq!(target.function, ["Handler", "handle"]);
        assert_eq!(target.rest, "db=/srv/db  size=3 ");
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(Target::parse("  "), Err(TargetError::Empty));
        for bad in [
            "app", "app:", ":f", "app:f:g", "my-app:f", "app..x:f", "app:1f",
        ] {
            assert_eq!(
                Target::parse(bad),
                Err(TargetError::Malformed(bad.to_string())),
                "{bad}"
            );
        }
    }
}
