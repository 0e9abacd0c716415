//! `builtin:ring-placement` (the default placement): consistent hashing with virtual nodes, as the
//! original goutube ring (see the `placement-rules` crate). The ring is rebuilt only when the
//! member list changes. Takes no configuration.

wit_bindgen::generate!({ world: "placement", path: "../../schema/wit" });

use std::cell::RefCell;

use placement_rules::Ring;

thread_local! {
    static RING: RefCell<Ring> = RefCell::new(Ring::default());
}

struct RingPlacement;

impl Guest for RingPlacement {
    fn configure(config: String) -> Result<(), String> {
        if config.trim().is_empty() {
            Ok(())
        } else {
            Err("ring-placement takes no configuration".into())
        }
    }

    fn owners(key: String, members: Vec<Member>, replicas: u32) -> Vec<String> {
        let members: Vec<placement_rules::Member> = members
            .into_iter()
            .map(|m| placement_rules::Member {
                name: m.name,
                role: m.role,
                virtual_nodes: m.virtual_nodes,
            })
            .collect();
        RING.with_borrow_mut(|ring| {
            if !ring.built_from(&members) {
                *ring = Ring::new(&members);
            }
            ring.owners(&key, replicas)
        })
    }
}

export!(RingPlacement);
