//! The three-node cluster from nats/cluster.conf.

use std::time::Duration;

use herald_natsd::NatsCluster;

use crate::support::{eventually, js_ok};

#[tokio::test]
async fn cluster_forms_keeps_r3_streams_and_survives_a_node_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = NatsCluster::start(None, dir.path())
        .await
        .expect("cluster starts");
    let urls = cluster.client_urls();
    assert_eq!(urls.len(), 3);

    // Every node is in cluster `herald` and routes to the two others.
    let names: Vec<String> = {
        let mut names = Vec::new();
        for node in &cluster.nodes {
            let varz = node.monitor("/varz").await.expect("/varz");
            assert_eq!(varz["cluster"]["name"], "herald", "{varz}");
            names.push(
                varz["server_name"]
                    .as_str()
                    .expect("server_name")
                    .to_owned(),
            );
        }
        names
    };
    assert_eq!(names, ["herald-1", "herald-2", "herald-3"]);
    for (node, name) in cluster.nodes.iter().zip(&names) {
        let routez = node.monitor("/routez").await.expect("/routez");
        let mut remotes: Vec<&str> = routez["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .filter_map(|r| r["remote_name"].as_str())
            .collect();
        remotes.sort_unstable();
        remotes.dedup();
        let others: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| n != name)
            .collect();
        assert_eq!(remotes, others, "routes of {name}");
        let jsz = node.monitor("/jsz").await.expect("/jsz");
        assert_eq!(jsz["meta_cluster"]["cluster_size"], 3, "{jsz}");
    }

    let created = js_ok(
        &urls[0],
        "$JS.API.STREAM.CREATE.DURABLE",
        None,
        r#"{"name":"DURABLE","subjects":["durable.>"],"num_replicas":3,"storage":"file"}"#,
    )
    .await;
    assert_eq!(created["config"]["num_replicas"], 3, "{created}");
    let ack = js_ok(&urls[0], "durable.a", Some("a"), "first").await;
    assert_eq!(ack["seq"], 1, "{ack}");

    // One node of three down: the stream still has a quorum and accepts writes.
    cluster.nodes[2].kill();
    let ack = js_ok(&urls[0], "durable.b", Some("b"), "second").await;
    assert_eq!(ack["seq"], 2, "{ack}");

    cluster.nodes[2].restart().await.expect("node 3 restarts");
    assert_eq!(
        cluster.nodes[2].client_url(),
        urls[2],
        "same port after restart"
    );
    cluster.wait_ready().await.expect("cluster whole again");

    // The restarted node catches up: its replica has both messages.
    let url = urls[2].clone();
    eventually(
        Duration::from_secs(20),
        "restarted replica catches up",
        || {
            let url = url.clone();
            async move {
                let info = js_ok(&url, "$JS.API.STREAM.INFO.DURABLE", None, "").await;
                let replicas = info["cluster"]["replicas"].as_array()?;
                let all_current =
                    replicas.len() == 2 && replicas.iter().all(|r| r["current"] == true);
                (info["state"]["messages"] == 2 && all_current).then_some(())
            }
        },
    )
    .await;
}
