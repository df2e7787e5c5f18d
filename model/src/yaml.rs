//! YAML read from users (manifest files, `weft inject` input): a document is refused before
//! it is parsed when its aliases would expand it far beyond its size. Shared by the
//! controller's manifest directory and the injector's `weft inject`.

/// Nodes a document may gain through YAML aliases (`*name`) beyond one per byte of its text.
pub const MAX_ALIAS_NODES: usize = 10_000;

/// Refuses a document whose aliases expand it beyond one node per byte plus
/// [`MAX_ALIAS_NODES`] (a document without aliases never has more nodes than bytes).
///
/// serde_yaml_ng bounds alias *jumps*, not what they expand to: nested aliases ("billion
/// laughs") let a 2 KB file expand to gigabytes before its limit trips. This pass walks the
/// document as the deserializer expands it, allocating nothing, and stops at the budget.
pub fn check_expansion(doc: &str) -> Result<(), serde_yaml_ng::Error> {
    use serde::de::DeserializeSeed as _;
    let budget = Budget {
        nodes: &std::cell::Cell::new(0),
        limit: doc.len() + MAX_ALIAS_NODES,
    };
    budget.deserialize(serde_yaml_ng::Deserializer::from_str(doc))
}

#[derive(Clone, Copy)]
struct Budget<'a> {
    nodes: &'a std::cell::Cell<usize>,
    limit: usize,
}

impl Budget<'_> {
    fn tick<E: serde::de::Error>(self) -> Result<(), E> {
        self.nodes.set(self.nodes.get() + 1);
        if self.nodes.get() > self.limit {
            return Err(E::custom(format_args!(
                "the document expands to more than {} nodes through YAML aliases (*name); write the repeated parts out",
                self.limit
            )));
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Budget<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Budget<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.tick()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.tick()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.tick()
    }
    fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<(), E> {
        self.tick()
    }
    fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<(), E> {
        self.tick()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.tick()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.tick()
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.tick()
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.tick()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.tick()?;
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.tick()?;
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.tick()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.tick()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): the tag, then its value.
        use serde::de::VariantAccess as _;
        self.tick()?;
        let ((), value) = data.variant_seed(self)?;
        value.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_bombs_are_refused_and_plain_documents_pass() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let prev = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let err = check_expansion(&bomb).unwrap_err().to_string();
        assert!(err.contains("expands to more than"), "{err}");
        check_expansion("kind: Pod\nmetadata: {name: a, labels: {x: &v y, z: *v}}\n").unwrap();
    }
}
