//! `builtin:rendezvous-placement`: weighted highest-random-weight (rendezvous) hashing (see the
//! `placement-rules` crate). Adding or removing a member only moves the keys it wins or held.
//! Takes no configuration.

wit_bindgen::generate!({ world: "placement", path: "../../schema/wit" });

struct Rendezvous;

impl Guest for Rendezvous {
    fn configure(config: String) -> Result<(), String> {
        if config.trim().is_empty() {
            Ok(())
        } else {
            Err("rendezvous-placement takes no configuration".into())
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
        placement_rules::rendezvous(&key, &members, replicas)
    }
}

export!(Rendezvous);
