//! Several server addresses (the nodes of a cluster, issue 19): `public_addr` may list
//! them, tokens carry the list, and an agent tries them in a random order until one
//! answers, then keeps using that one.

use herald_tests::{free_port, TestAgent, TestServer};

#[test]
fn an_agent_tries_every_server_address_until_one_answers() {
    let server = TestServer::start("addresses");
    // A node that is down (nothing listens on its UDP port) beside the live one.
    let dead = free_port();
    let list = format!("127.0.0.1:{dead},127.0.0.1:{}", server.quic_port);
    let admin = server.data_dir().join("admin.toml");
    let text = std::fs::read_to_string(&admin).expect("admin.toml");
    let line = text
        .lines()
        .find(|l| l.starts_with("public_addr = "))
        .expect("public_addr in admin.toml")
        .to_string();
    std::fs::write(
        &admin,
        text.replace(&line, &format!("public_addr = \"{list}\"")),
    )
    .expect("write admin.toml");

    // Whichever address comes first, enrollment and the link find the live node.
    for name in ["node-a", "node-b", "node-c"] {
        let mut agent = TestAgent::enroll_with_token(&server, name, &server.token(&[]));
        assert_eq!(
            agent.status()["server"],
            list.as_str(),
            "the token carries the list"
        );
        agent.spawn();
        agent.wait_online(&server);
        let log = agent.log();
        let live = format!("127.0.0.1:{}", server.quic_port);
        assert!(
            log.lines()
                .any(|l| l.contains("connected to the server at this address") && l.contains(&live)),
            "{log}"
        );
    }
}
