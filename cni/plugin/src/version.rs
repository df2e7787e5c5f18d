//! CNI version support and negotiation with delegated plugins.
//!
//! weft-cni speaks 1.1.0 and serves 1.0.0 configurations: the two share one
//! result format, and 1.1.0 adds only the STATUS and GC commands. Older
//! versions (0.x) are refused with code 1 rather than half-supported.
//!
//! A delegated IPAM plugin may be older than the configuration: Debian's
//! containernetworking-plugins 1.1.x ship a `host-local` that stops at 1.0.0.
//! Since the formats are identical, the plugin asks the IPAM plugin for its
//! versions (VERSION) and hands it the configuration under the highest version
//! both sides support ([`negotiate`]); STATUS and GC are delegated only to an
//! IPAM plugin that supports 1.1.0 (an older one has no such command).

/// The versions weft-cni accepts in `cniVersion`, oldest first.
pub const SUPPORTED: &[&str] = &["1.0.0", "1.1.0"];

/// The newest version, used for answers when the input names none.
pub const LATEST: &str = "1.1.0";

/// The first version with STATUS and GC.
pub const STATUS_AND_GC_SINCE: &str = "1.1.0";

/// A parsed `major.minor.patch` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// Parses `1.0.0`-style versions; `None` for anything else.
    pub fn parse(s: &str) -> Option<Version> {
        let mut parts = s.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Version(major, minor, patch))
    }
}

/// Whether weft-cni serves configurations of `version`.
pub fn is_supported(version: &str) -> bool {
    SUPPORTED.contains(&version)
}

/// The supported versions as a human list, for error messages.
pub fn supported_list() -> String {
    SUPPORTED.join(", ")
}

/// Whether `version` has the STATUS and GC commands.
pub fn has_status_and_gc(version: &str) -> bool {
    match (Version::parse(version), Version::parse(STATUS_AND_GC_SINCE)) {
        (Some(v), Some(since)) => v >= since,
        _ => false,
    }
}

/// The version to hand a delegated plugin that supports `theirs`, for a
/// configuration of version `ours`: `ours` itself if they support it,
/// otherwise the highest version both sides support (all of ours share one
/// result format). `None` if there is none.
pub fn negotiate(ours: &str, theirs: &[String]) -> Option<String> {
    if theirs.iter().any(|t| t == ours) {
        return Some(ours.to_string());
    }
    let ours_v = Version::parse(ours)?;
    SUPPORTED
        .iter()
        .rev()
        .filter(|v| Version::parse(v).is_some_and(|v| v <= ours_v))
        .find(|v| theirs.iter().any(|t| t == *v))
        .map(|v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn negotiation_table() {
        let debian_host_local = strings(&["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]);
        let modern = strings(&["0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
        let old = strings(&["0.3.1", "0.4.0"]);
        let cases: &[(&str, &[String], Option<&str>)] = &[
            ("1.1.0", &debian_host_local, Some("1.0.0")),
            ("1.1.0", &modern, Some("1.1.0")),
            ("1.0.0", &debian_host_local, Some("1.0.0")),
            ("1.0.0", &modern, Some("1.0.0")),
            ("1.1.0", &old, None),
            ("1.0.0", &old, None),
            ("garbage", &old, None),
        ];
        for (ours, theirs, want) in cases {
            assert_eq!(
                negotiate(ours, theirs).as_deref(),
                *want,
                "ours={ours} theirs={theirs:?}"
            );
        }
    }

    #[test]
    fn status_and_gc_need_1_1_0() {
        assert!(has_status_and_gc("1.1.0"));
        assert!(has_status_and_gc("1.2.0"));
        assert!(!has_status_and_gc("1.0.0"));
        assert!(!has_status_and_gc("0.4.0"));
        assert!(!has_status_and_gc("x"));
    }

    #[test]
    fn parse_versions() {
        assert_eq!(Version::parse("1.0.0"), Some(Version(1, 0, 0)));
        assert_eq!(Version::parse("1.0"), None);
        assert_eq!(Version::parse("1.0.0.0"), None);
        assert_eq!(Version::parse("a.b.c"), None);
        assert!(is_supported("1.0.0") && is_supported("1.1.0") && !is_supported("0.4.0"));
    }
}
