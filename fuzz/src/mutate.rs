//! Mutators: valid seed inputs changed a little, which reach states random bytes never do.
//!
//! Both kinds are proptest strategies over a list of mutations, so a failing input shrinks
//! to the seed plus the few mutations that matter.

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Map, Value};

/// One change to a byte string. Positions are taken modulo the current length.
#[derive(Clone, Debug)]
pub enum ByteMutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// Insert a token of the target's dictionary (`\r\n`, `---`, a header name).
    Token {
        at: usize,
        token: usize,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// Copy `len` bytes from another seed at `from` into this input at `at`.
    Splice {
        seed: usize,
        from: usize,
        len: usize,
        at: usize,
    },
    /// Repeat a slice, as length fields and nesting love.
    Repeat {
        at: usize,
        len: usize,
        times: u8,
    },
    /// Overwrite with a boundary integer (0, 0xff, 0x7fff, 0xffff, ...), big-endian.
    Boundary {
        at: usize,
        value: u32,
        width: u8,
    },
}

fn byte_mutation(n_seeds: usize, n_tokens: usize) -> impl Strategy<Value = ByteMutation> {
    let at = any::<usize>();
    prop_oneof![
        (at, 0u8..8).prop_map(|(at, bit)| ByteMutation::Flip { at, bit }),
        (at, any::<u8>()).prop_map(|(at, byte)| ByteMutation::Set { at, byte }),
        (at, vec(any::<u8>(), 1..8)).prop_map(|(at, bytes)| ByteMutation::Insert { at, bytes }),
        (at, 0..n_tokens.max(1)).prop_map(|(at, token)| ByteMutation::Token { at, token }),
        (at, 1usize..64).prop_map(|(at, len)| ByteMutation::Delete { at, len }),
        at.prop_map(|at| ByteMutation::Truncate { at }),
        (0..n_seeds.max(1), any::<usize>(), 1usize..128, at).prop_map(|(seed, from, len, at)| {
            ByteMutation::Splice {
                seed,
                from,
                len,
                at,
            }
        }),
        (at, 1usize..32, 1u8..16).prop_map(|(at, len, times)| ByteMutation::Repeat {
            at,
            len,
            times
        }),
        (
            at,
            prop::sample::select(vec![
                0u32,
                1,
                0x7f,
                0x80,
                0xff,
                0x100,
                0x3fff,
                0x4000,
                0x4001,
                0x7fff,
                0x8000,
                0xffff,
                0x10000,
                0xff_ffff,
                u32::MAX
            ]),
            prop::sample::select(vec![1u8, 2, 3, 4])
        )
            .prop_map(|(at, value, width)| ByteMutation::Boundary { at, value, width }),
    ]
}

fn apply_bytes(input: &mut Vec<u8>, m: &ByteMutation, seeds: &[Vec<u8>], tokens: &[Vec<u8>]) {
    let pos = |at: usize, len: usize| if len == 0 { 0 } else { at % (len + 1) };
    match m {
        ByteMutation::Flip { at, bit } if !input.is_empty() => {
            let i = at % input.len();
            input[i] ^= 1 << bit;
        }
        ByteMutation::Set { at, byte } if !input.is_empty() => {
            let i = at % input.len();
            input[i] = *byte;
        }
        ByteMutation::Insert { at, bytes } => {
            let i = pos(*at, input.len());
            input.splice(i..i, bytes.iter().copied());
        }
        ByteMutation::Token { at, token } if !tokens.is_empty() => {
            let i = pos(*at, input.len());
            input.splice(i..i, tokens[token % tokens.len()].iter().copied());
        }
        ByteMutation::Delete { at, len } if !input.is_empty() => {
            let i = at % input.len();
            let end = (i + len).min(input.len());
            input.drain(i..end);
        }
        ByteMutation::Truncate { at } => {
            let i = pos(*at, input.len());
            input.truncate(i);
        }
        ByteMutation::Splice {
            seed,
            from,
            len,
            at,
        } => {
            let src = &seeds[seed % seeds.len()];
            if !src.is_empty() {
                let f = from % src.len();
                let end = (f + len).min(src.len());
                let i = pos(*at, input.len());
                input.splice(i..i, src[f..end].iter().copied());
            }
        }
        ByteMutation::Repeat { at, len, times } if !input.is_empty() => {
            let i = at % input.len();
            let end = (i + len).min(input.len());
            let chunk = input[i..end].to_vec();
            for _ in 0..*times {
                input.splice(end..end, chunk.iter().copied());
            }
        }
        ByteMutation::Boundary { at, value, width } if !input.is_empty() => {
            let i = at % input.len();
            let bytes = value.to_be_bytes();
            let w = usize::from(*width).min(4);
            for (k, b) in bytes[4 - w..].iter().enumerate() {
                if let Some(slot) = input.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        _ => {}
    }
}

/// Inputs made from one of `seeds` by up to `max_mutations` byte mutations (0 included, so
/// the seeds themselves are checked too). `tokens` is the format's dictionary.
pub fn mutated_bytes(
    seeds: Vec<Vec<u8>>,
    tokens: Vec<Vec<u8>>,
    max_mutations: usize,
) -> impl Strategy<Value = Vec<u8>> {
    assert!(!seeds.is_empty(), "mutated_bytes needs at least one seed");
    let n = seeds.len();
    (0..n, vec(byte_mutation(n, tokens.len()), 0..=max_mutations)).prop_map(move |(i, muts)| {
        let mut input = seeds[i].clone();
        for m in &muts {
            apply_bytes(&mut input, m, &seeds, &tokens);
        }
        input
    })
}

/// Like [`mutated_bytes`] over text, for parsers that take `&str`: invalid UTF-8 is replaced
/// (the parser never sees it; the file reader in front of it rejects it).
pub fn mutated_text(
    seeds: Vec<String>,
    tokens: Vec<String>,
    max_mutations: usize,
) -> impl Strategy<Value = String> {
    mutated_bytes(
        seeds.into_iter().map(String::into_bytes).collect(),
        tokens.into_iter().map(String::into_bytes).collect(),
        max_mutations,
    )
    .prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// One change to a JSON document. `node` picks a node in pre-order, modulo the node count.
#[derive(Clone, Debug)]
pub enum JsonMutation {
    /// Replace a node with a small value (possibly of another type).
    Replace { node: usize, with: Value },
    /// Replace a node with a string or key seen somewhere in the seeds.
    Word { node: usize, word: usize },
    /// Replace a node with a copy of another node (a subtree moved where it does not belong).
    Copy { node: usize, from: usize },
    /// Remove a node from its object or array.
    Remove { node: usize },
    /// Add a field to an object node (a known key, with a small value).
    AddField {
        node: usize,
        key: usize,
        with: Value,
    },
    /// Wrap a node in an array.
    Wrap { node: usize },
    /// Repeat an array's elements (long lists).
    Grow { node: usize, times: u8 },
}

/// Small values of every JSON type, with the boundary ones parsers trip on.
pub fn small_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(vec![
            0i64,
            -1,
            1,
            255,
            256,
            65535,
            65536,
            i32::MAX as i64,
            u32::MAX as i64,
            i64::MIN,
            i64::MAX
        ])
        .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        prop::sample::select(vec![0.5f64, -0.0, 1e300, -1e-300, 3.5]).prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::String),
        "\\PC{0,8}".prop_map(Value::String),
        prop::sample::select(vec![
            "",
            " ",
            "-",
            "0",
            "-1",
            "1e309",
            "NaN",
            "/",
            "..",
            "*",
            "a/b",
            "10.0.0.1/33",
            "::/0",
            "0.0.0.0/0",
            "fe80::1%eth0",
            "1.1.1.1",
            "256.1.1.1",
            "TCP",
            "UDP",
            "SCTP",
            "ICMP",
            "80-79",
            "65536",
            "0x10",
            "1h",
            "-1s",
            "99999999999h",
            "0.0",
            "1.5",
            "inf",
            "enabled",
            "disabled",
            "spiffe://a/ns/b/sa/c"
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..3).prop_map(Value::Array),
            vec(("[a-zA-Z]{1,8}", inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn json_mutation(n_words: usize) -> impl Strategy<Value = JsonMutation> {
    let node = any::<usize>();
    prop_oneof![
        3 => (node, small_value()).prop_map(|(node, with)| JsonMutation::Replace { node, with }),
        3 => (node, 0..n_words.max(1)).prop_map(|(node, word)| JsonMutation::Word { node, word }),
        1 => (node, any::<usize>()).prop_map(|(node, from)| JsonMutation::Copy { node, from }),
        3 => node.prop_map(|node| JsonMutation::Remove { node }),
        2 => (node, 0..n_words.max(1), small_value())
            .prop_map(|(node, key, with)| JsonMutation::AddField { node, key, with }),
        1 => node.prop_map(|node| JsonMutation::Wrap { node }),
        1 => (node, 1u8..40).prop_map(|(node, times)| JsonMutation::Grow { node, times }),
    ]
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

fn nth_mut<'a>(v: &'a mut Value, n: &mut usize) -> Option<&'a mut Value> {
    if *n == 0 {
        return Some(v);
    }
    *n -= 1;
    match v {
        Value::Array(a) => a.iter_mut().find_map(|c| nth_mut(c, n)),
        Value::Object(o) => o.values_mut().find_map(|c| nth_mut(c, n)),
        _ => None,
    }
}

fn nth<'a>(v: &'a Value, n: &mut usize) -> Option<&'a Value> {
    if *n == 0 {
        return Some(v);
    }
    *n -= 1;
    match v {
        Value::Array(a) => a.iter().find_map(|c| nth(c, n)),
        Value::Object(o) => o.values().find_map(|c| nth(c, n)),
        _ => None,
    }
}

/// Removes the `n`th node (not the root) from its parent.
fn remove_nth(v: &mut Value, n: &mut usize) -> bool {
    match v {
        Value::Array(a) => {
            for i in 0..a.len() {
                if *n == 0 {
                    a.remove(i);
                    return true;
                }
                *n -= 1;
                if remove_nth(&mut a[i], n) {
                    return true;
                }
            }
            false
        }
        Value::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for k in keys {
                if *n == 0 {
                    o.remove(&k);
                    return true;
                }
                *n -= 1;
                if let Some(child) = o.get_mut(&k) {
                    if remove_nth(child, n) {
                        return true;
                    }
                }
            }
            false
        }
        _ => false,
    }
}

/// Every string and object key in `v`: the dictionary of [`mutated_json`].
pub fn words(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|c| words(c, out)),
        Value::Object(o) => {
            for (k, c) in o {
                out.push(k.clone());
                words(c, out);
            }
        }
        _ => {}
    }
}

fn apply_json(doc: &mut Value, m: &JsonMutation, dict: &[String]) {
    let total = count(doc);
    let pick = |n: usize| n % total;
    match m {
        JsonMutation::Replace { node, with } => {
            if let Some(slot) = nth_mut(doc, &mut pick(*node)) {
                *slot = with.clone();
            }
        }
        JsonMutation::Word { node, word } if !dict.is_empty() => {
            if let Some(slot) = nth_mut(doc, &mut pick(*node)) {
                *slot = Value::String(dict[word % dict.len()].clone());
            }
        }
        JsonMutation::Copy { node, from } => {
            let src = nth(doc, &mut pick(*from)).cloned();
            if let (Some(src), Some(slot)) = (src, nth_mut(doc, &mut pick(*node))) {
                if count(&src) < 2000 {
                    *slot = src;
                }
            }
        }
        JsonMutation::Remove { node } if total > 1 => {
            let mut n = pick(*node).max(1) - 1;
            remove_nth(doc, &mut n);
        }
        JsonMutation::AddField { node, key, with } if !dict.is_empty() => {
            if let Some(Value::Object(o)) = nth_mut(doc, &mut pick(*node)) {
                o.insert(dict[key % dict.len()].clone(), with.clone());
            }
        }
        JsonMutation::Wrap { node } => {
            if let Some(slot) = nth_mut(doc, &mut pick(*node)) {
                *slot = Value::Array(vec![slot.take()]);
            }
        }
        JsonMutation::Grow { node, times } => {
            if let Some(Value::Array(a)) = nth_mut(doc, &mut pick(*node)) {
                if count(&Value::Array(a.clone())) < 200 {
                    let copy = a.clone();
                    for _ in 0..*times {
                        a.extend(copy.iter().cloned());
                    }
                }
            }
        }
        _ => {}
    }
}

/// Documents made from one of `seeds` by up to `max_mutations` structural mutations: the
/// shape stays close to a real object, so conversion code past the decoder gets exercised.
pub fn mutated_json(seeds: Vec<Value>, max_mutations: usize) -> impl Strategy<Value = Value> {
    assert!(!seeds.is_empty(), "mutated_json needs at least one seed");
    let mut dict = Vec::new();
    for s in &seeds {
        words(s, &mut dict);
    }
    dict.sort();
    dict.dedup();
    let n = seeds.len();
    (0..n, vec(json_mutation(dict.len()), 0..=max_mutations)).prop_map(move |(i, muts)| {
        let mut doc = seeds[i].clone();
        for m in &muts {
            apply_json(&mut doc, m, &dict);
        }
        doc
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn mutations_keep_seeds_reachable_and_change_them() {
        let seeds = vec![serde_json::json!({"a": [1, 2, {"b": "c"}], "d": null})];
        let s = mutated_json(seeds.clone(), 4);
        let mut runner = TestRunner::deterministic();
        let (mut same, mut changed) = (0, 0);
        for _ in 0..200 {
            let v = s.new_tree(&mut runner).expect("tree").current();
            if v == seeds[0] {
                same += 1
            } else {
                changed += 1
            }
        }
        assert!(same > 0 && changed > 100, "same {same} changed {changed}");
    }
}
