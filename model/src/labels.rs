//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), the one
//! implementation used by services, NetworkPolicy evaluation and webhooks.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// A parsed label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    In { key: String, values: Vec<String> },
    NotIn { key: String, values: Vec<String> },
    Exists { key: String },
    DoesNotExist { key: String },
}

/// A `matchExpressions` entry that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("matchExpressions[{index}].operator is {operator:?}; expected In, NotIn, Exists or DoesNotExist")]
    Operator { index: usize, operator: String },
    #[error("matchExpressions[{index}] ({operator} on {key:?}) needs at least one value")]
    NoValues {
        index: usize,
        key: String,
        operator: String,
    },
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn { key, values } => {
                labels.get(key).is_none_or(|v| !values.contains(v))
            }
            Requirement::Exists { key } => labels.contains_key(key),
            Requirement::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

impl Selector {
    /// A selector from `matchLabels` only (a Service's `spec.selector`).
    pub fn from_map(map: &Labels) -> Self {
        Selector {
            requirements: map
                .iter()
                .map(|(k, v)| Requirement::In {
                    key: k.clone(),
                    values: vec![v.clone()],
                })
                .collect(),
        }
    }

    /// A selector from the API type, validating operators.
    pub fn from_api(sel: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements =
            Selector::from_map(&sel.match_labels.clone().unwrap_or_default()).requirements;
        for (index, expr) in sel.match_expressions.iter().flatten().enumerate() {
            let key = expr.key.clone();
            let values = expr.values.clone().unwrap_or_default();
            let needs_values = |values: Vec<String>| {
                if values.is_empty() {
                    Err(SelectorError::NoValues {
                        index,
                        key: key.clone(),
                        operator: expr.operator.clone(),
                    })
                } else {
                    Ok(values)
                }
            };
            requirements.push(match expr.operator.as_str() {
                "In" => Requirement::In {
                    key: key.clone(),
                    values: needs_values(values)?,
                },
                "NotIn" => Requirement::NotIn {
                    key: key.clone(),
                    values: needs_values(values)?,
                },
                "Exists" => Requirement::Exists { key },
                "DoesNotExist" => Requirement::DoesNotExist { key },
                other => {
                    return Err(SelectorError::Operator {
                        index,
                        operator: other.to_string(),
                    })
                }
            });
        }
        Ok(Selector { requirements })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    #[test]
    fn table() {
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        let cases: Vec<(LabelSelector, bool)> = vec![
            (LabelSelector::default(), true),
            (
                LabelSelector {
                    match_labels: Some(labels(&[("app", "web")])),
                    ..Default::default()
                },
                true,
            ),
            (
                LabelSelector {
                    match_labels: Some(labels(&[("app", "db")])),
                    ..Default::default()
                },
                false,
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("tier", "In", &["front", "back"])]),
                    ..Default::default()
                },
                true,
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("tier", "NotIn", &["front"])]),
                    ..Default::default()
                },
                false,
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("missing", "NotIn", &["x"])]),
                    ..Default::default()
                },
                true,
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("app", "Exists", &[])]),
                    ..Default::default()
                },
                true,
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("app", "DoesNotExist", &[])]),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (i, (sel, want)) in cases.iter().enumerate() {
            let parsed = Selector::from_api(sel).expect("valid selector");
            assert_eq!(parsed.matches(&pod), *want, "case {i}: {sel:?}");
        }
    }

    #[test]
    fn invalid_expressions_are_named() {
        let bad = LabelSelector {
            match_expressions: Some(vec![expr("app", "Like", &["x"])]),
            ..Default::default()
        };
        let err = Selector::from_api(&bad).expect_err("bad operator");
        assert!(err.to_string().contains("\"Like\""), "{err}");
        let empty = LabelSelector {
            match_expressions: Some(vec![expr("app", "In", &[])]),
            ..Default::default()
        };
        assert!(matches!(
            Selector::from_api(&empty),
            Err(SelectorError::NoValues { index: 0, .. })
        ));
    }
}
