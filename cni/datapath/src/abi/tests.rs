//! The Rust mirrors against the C layouts, read from the BTF of the compiled object.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};

use super::*;
use crate::OBJECT;

/// Struct layouts in a BTF blob: name → (size, field name → byte offset).
type Layouts = HashMap<String, (usize, HashMap<String, usize>)>;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn cstr_at(strings: &[u8], off: usize) -> String {
    let end = strings[off..]
        .iter()
        .position(|&c| c == 0)
        .map_or(strings.len(), |p| off + p);
    String::from_utf8_lossy(&strings[off..end]).into_owned()
}

/// A small BTF reader: just enough to list named structs with their member offsets.
fn btf_structs(btf: &[u8]) -> Layouts {
    assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(btf, 4) as usize;
    let type_off = u32_at(btf, 8) as usize;
    let type_len = u32_at(btf, 12) as usize;
    let str_off = u32_at(btf, 16) as usize;
    let str_len = u32_at(btf, 20) as usize;
    let types = &btf[hdr_len + type_off..hdr_len + type_off + type_len];
    let strings = &btf[hdr_len + str_off..hdr_len + str_off + str_len];

    let mut out = Layouts::new();
    let mut pos = 0;
    while pos < types.len() {
        let name_off = u32_at(types, pos) as usize;
        let info = u32_at(types, pos + 4);
        let size = u32_at(types, pos + 8) as usize;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        pos += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,     // INT, VAR, DECL_TAG
            3 => 12,              // ARRAY
            4 | 5 => vlen * 12,   // STRUCT, UNION
            6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
            15 | 19 => vlen * 12, // DATASEC, ENUM64
            _ => 0,               // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
        };
        if kind == 4 && name_off != 0 {
            let mut members = HashMap::new();
            for m in 0..vlen {
                let at = pos + m * 12;
                let mname = cstr_at(strings, u32_at(types, at) as usize);
                let bits = u32_at(types, at + 8);
                let bits = if kind_flag { bits & 0x00ff_ffff } else { bits };
                members.insert(mname, bits as usize / 8);
            }
            out.insert(cstr_at(strings, name_off), (size, members));
        }
        pos += extra;
    }
    out
}

fn object_layouts() -> Layouts {
    use object::{Object, ObjectSection};
    let file = object::File::parse(OBJECT).expect("the embedded object is an ELF file");
    let btf = file
        .section_by_name(".BTF")
        .expect("the object has BTF (compiled with -g)");
    btf_structs(btf.data().expect(".BTF data"))
}

/// (C struct, Rust size, [(C field, Rust offset)])
type Mirror = (&'static str, usize, Vec<(&'static str, usize)>);

fn mirrors() -> Vec<Mirror> {
    let p4 = offset_of!(Policy4Key, data);
    let p6 = offset_of!(Policy6Key, data);
    vec![
        (
            "weft_endpoint",
            size_of::<EndpointValue>(),
            vec![
                ("ep_id", offset_of!(EndpointValue, ep_id)),
                ("flags", offset_of!(EndpointValue, flags)),
            ],
        ),
        (
            "weft_endpoint_addrs",
            size_of::<EndpointAddrsValue>(),
            vec![
                ("count4", offset_of!(EndpointAddrsValue, count4)),
                ("count6", offset_of!(EndpointAddrsValue, count6)),
                ("pad", offset_of!(EndpointAddrsValue, pad)),
                ("addr4", offset_of!(EndpointAddrsValue, addr4)),
                ("addr6", offset_of!(EndpointAddrsValue, addr6)),
            ],
        ),
        (
            "weft_policy4_key",
            size_of::<Policy4Key>(),
            vec![
                ("prefixlen", offset_of!(Policy4Key, prefixlen)),
                ("ep_id", p4 + offset_of!(Policy4KeyData, ep_id_be)),
                ("direction", p4 + offset_of!(Policy4KeyData, direction)),
                ("proto", p4 + offset_of!(Policy4KeyData, proto)),
                ("pad", p4 + offset_of!(Policy4KeyData, pad)),
                ("addr", p4 + offset_of!(Policy4KeyData, addr)),
            ],
        ),
        (
            "weft_policy6_key",
            size_of::<Policy6Key>(),
            vec![
                ("prefixlen", offset_of!(Policy6Key, prefixlen)),
                ("ep_id", p6 + offset_of!(Policy6KeyData, ep_id_be)),
                ("direction", p6 + offset_of!(Policy6KeyData, direction)),
                ("proto", p6 + offset_of!(Policy6KeyData, proto)),
                ("pad", p6 + offset_of!(Policy6KeyData, pad)),
                ("addr", p6 + offset_of!(Policy6KeyData, addr)),
            ],
        ),
        (
            "weft_port_range",
            size_of::<PortRangeValue>(),
            vec![
                ("lo", offset_of!(PortRangeValue, lo)),
                ("hi", offset_of!(PortRangeValue, hi)),
                ("policy", offset_of!(PortRangeValue, policy)),
            ],
        ),
        (
            "weft_policy_value",
            size_of::<PolicyValue>(),
            vec![
                ("count", offset_of!(PolicyValue, count)),
                ("ranges", offset_of!(PolicyValue, ranges)),
            ],
        ),
        (
            "weft_ct_key",
            size_of::<CtKey>(),
            vec![
                ("ep_id", offset_of!(CtKey, ep_id)),
                ("direction", offset_of!(CtKey, direction)),
                ("proto", offset_of!(CtKey, proto)),
                ("family", offset_of!(CtKey, family)),
                ("pad", offset_of!(CtKey, pad)),
                ("saddr", offset_of!(CtKey, saddr)),
                ("daddr", offset_of!(CtKey, daddr)),
                ("sport", offset_of!(CtKey, sport)),
                ("dport", offset_of!(CtKey, dport)),
            ],
        ),
        (
            "weft_ct_value",
            size_of::<CtValue>(),
            vec![
                ("created_ns", offset_of!(CtValue, created_ns)),
                ("last_seen_ns", offset_of!(CtValue, last_seen_ns)),
                ("policy", offset_of!(CtValue, policy)),
                ("flags", offset_of!(CtValue, flags)),
            ],
        ),
        (
            "weft_policy_counters",
            size_of::<PolicyCountersValue>(),
            vec![
                (
                    "allowed_conns",
                    offset_of!(PolicyCountersValue, allowed_conns),
                ),
                (
                    "allowed_packets",
                    offset_of!(PolicyCountersValue, allowed_packets),
                ),
            ],
        ),
        (
            "weft_drop_key",
            size_of::<DropKey>(),
            vec![
                ("ep_id", offset_of!(DropKey, ep_id)),
                ("direction", offset_of!(DropKey, direction)),
                ("pad", offset_of!(DropKey, pad)),
            ],
        ),
        (
            "weft_flow_event",
            size_of::<FlowEventRaw>(),
            vec![
                ("ts_ns", offset_of!(FlowEventRaw, ts_ns)),
                ("ep_id", offset_of!(FlowEventRaw, ep_id)),
                ("policy", offset_of!(FlowEventRaw, policy)),
                ("direction", offset_of!(FlowEventRaw, direction)),
                ("verdict", offset_of!(FlowEventRaw, verdict)),
                ("proto", offset_of!(FlowEventRaw, proto)),
                ("family", offset_of!(FlowEventRaw, family)),
                ("sport", offset_of!(FlowEventRaw, sport)),
                ("dport", offset_of!(FlowEventRaw, dport)),
                ("saddr", offset_of!(FlowEventRaw, saddr)),
                ("daddr", offset_of!(FlowEventRaw, daddr)),
                ("reason", offset_of!(FlowEventRaw, reason)),
                ("pad", offset_of!(FlowEventRaw, pad)),
            ],
        ),
        (
            "weft_lb_svc_key",
            size_of::<LbSvcKey>(),
            vec![
                ("family", offset_of!(LbSvcKey, family)),
                ("proto", offset_of!(LbSvcKey, proto)),
                ("port", offset_of!(LbSvcKey, port)),
                ("addr", offset_of!(LbSvcKey, addr)),
            ],
        ),
        (
            "weft_lb_backend",
            size_of::<LbBackend>(),
            vec![
                ("addr", offset_of!(LbBackend, addr)),
                ("port", offset_of!(LbBackend, port)),
                ("flags", offset_of!(LbBackend, flags)),
            ],
        ),
        (
            "weft_lb_svc",
            size_of::<LbSvcValue>(),
            vec![
                ("svc_id", offset_of!(LbSvcValue, svc_id)),
                ("count", offset_of!(LbSvcValue, count)),
                ("flags", offset_of!(LbSvcValue, flags)),
                (
                    "affinity_timeout_s",
                    offset_of!(LbSvcValue, affinity_timeout_s),
                ),
                ("pad", offset_of!(LbSvcValue, pad)),
                ("backends", offset_of!(LbSvcValue, backends)),
            ],
        ),
        (
            "weft_lb_ct_key",
            size_of::<LbCtKey>(),
            vec![
                ("family", offset_of!(LbCtKey, family)),
                ("proto", offset_of!(LbCtKey, proto)),
                ("dir", offset_of!(LbCtKey, dir)),
                ("pad", offset_of!(LbCtKey, pad)),
                ("saddr", offset_of!(LbCtKey, saddr)),
                ("daddr", offset_of!(LbCtKey, daddr)),
                ("sport", offset_of!(LbCtKey, sport)),
                ("dport", offset_of!(LbCtKey, dport)),
            ],
        ),
        (
            "weft_lb_ct_value",
            size_of::<LbCtValue>(),
            vec![
                ("created_ns", offset_of!(LbCtValue, created_ns)),
                ("last_seen_ns", offset_of!(LbCtValue, last_seen_ns)),
                ("addr", offset_of!(LbCtValue, addr)),
                ("port", offset_of!(LbCtValue, port)),
                ("pad", offset_of!(LbCtValue, pad)),
                ("svc_id", offset_of!(LbCtValue, svc_id)),
                ("flags", offset_of!(LbCtValue, flags)),
                ("pad2", offset_of!(LbCtValue, pad2)),
            ],
        ),
        (
            "weft_lb_affinity_key",
            size_of::<LbAffinityKey>(),
            vec![
                ("svc_id", offset_of!(LbAffinityKey, svc_id)),
                ("family", offset_of!(LbAffinityKey, family)),
                ("pad", offset_of!(LbAffinityKey, pad)),
                ("client", offset_of!(LbAffinityKey, client)),
            ],
        ),
        (
            "weft_lb_affinity_value",
            size_of::<LbAffinityValue>(),
            vec![
                ("last_seen_ns", offset_of!(LbAffinityValue, last_seen_ns)),
                ("backend", offset_of!(LbAffinityValue, backend)),
                ("pad", offset_of!(LbAffinityValue, pad)),
            ],
        ),
        (
            "weft_lb_snat_value",
            size_of::<LbSnatValue>(),
            vec![
                ("created_ns", offset_of!(LbSnatValue, created_ns)),
                ("last_seen_ns", offset_of!(LbSnatValue, last_seen_ns)),
                ("addr", offset_of!(LbSnatValue, addr)),
                ("nat_addr", offset_of!(LbSnatValue, nat_addr)),
                ("port", offset_of!(LbSnatValue, port)),
                ("nat_port", offset_of!(LbSnatValue, nat_port)),
                ("svc_id", offset_of!(LbSnatValue, svc_id)),
                ("flags", offset_of!(LbSnatValue, flags)),
                ("pad", offset_of!(LbSnatValue, pad)),
            ],
        ),
        (
            "weft_lb_stats",
            size_of::<LbStatsValue>(),
            vec![
                ("conns", offset_of!(LbStatsValue, conns)),
                ("refused", offset_of!(LbStatsValue, refused)),
            ],
        ),
    ]
}

#[test]
fn rust_mirrors_match_the_c_layouts_in_the_object_btf() {
    let c = object_layouts();
    for (name, rust_size, fields) in mirrors() {
        let (c_size, c_fields) = c
            .get(name)
            .unwrap_or_else(|| panic!("struct {name} is not in the object's BTF"));
        assert_eq!(*c_size, rust_size, "size of struct {name}");
        assert_eq!(
            c_fields.len(),
            fields.len(),
            "field count of struct {name}: C has {:?}",
            c_fields.keys().collect::<Vec<_>>()
        );
        for (field, rust_off) in fields {
            let c_off = c_fields
                .get(field)
                .unwrap_or_else(|| panic!("struct {name} has no field {field} in C"));
            assert_eq!(*c_off, rust_off, "offset of {name}.{field}");
        }
    }
}

#[test]
fn aya_lpm_key_places_the_data_where_c_expects_it() {
    // aya's lpm_trie::Key is `repr(C, packed) { prefix_len: u32, data: K }`.
    assert_eq!(
        size_of::<aya::maps::lpm_trie::Key<Policy4KeyData>>(),
        size_of::<Policy4Key>()
    );
    assert_eq!(
        size_of::<aya::maps::lpm_trie::Key<Policy6KeyData>>(),
        size_of::<Policy6Key>()
    );
}

#[test]
fn the_object_defines_every_map_and_both_programs() {
    let obj = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
    for name in map::ALL {
        assert!(
            obj.maps.contains_key(name),
            "map {name} missing from the object"
        );
    }
    for prog in [crate::PROG_FROM_POD, crate::PROG_TO_POD] {
        assert!(obj.programs.contains_key(prog), "program {prog} missing");
    }
}
