//! One line for an error and its causes, each said once.
//!
//! Errors in this workspace often put their cause in their own message (`"cannot read {path}:
//! {source}"`) *and* expose it as `source()`, so that both a plain `{}` and a chain walker say
//! something useful; printing the chain (`anyhow`'s `{:#}`) then repeats each cause. Binaries
//! print their fatal errors with [`chain`], which skips a cause whose message the line already
//! holds.

use std::error::Error;

/// `outer: cause: root`, leaving out each message already said.
pub fn chain<'a>(errors: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut line = String::new();
    for e in errors {
        let m = e.to_string();
        if m.is_empty() || line.contains(&m) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&m);
    }
    line
}

/// [`chain`] of an error and its `source()`s.
pub fn error<'a>(e: &'a (dyn Error + 'static)) -> String {
    chain(std::iter::successors(
        Some(e),
        |e: &&'a (dyn Error + 'static)| (*e).source(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("the pod's spec does not parse: {source}")]
    struct Malformed {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("document 0: {0}")]
    struct Doc(#[source] Malformed);

    #[test]
    fn each_cause_is_said_once() {
        let e = Doc(Malformed {
            source: std::io::Error::other("expected a sequence"),
        });
        assert_eq!(
            error(&e),
            "document 0: the pod's spec does not parse: expected a sequence"
        );
        // Causes not in the message are kept.
        #[derive(Debug, thiserror::Error)]
        #[error("reading x.yaml")]
        struct Read(#[source] std::io::Error);
        assert_eq!(
            error(&Read(std::io::Error::other("permission denied"))),
            "reading x.yaml: permission denied"
        );
    }
}
