//! Discovery on loopback: eight in-process daemons bootstrapped from one seed with mDNS off
//! find each other, survive the seed's death, and find a late joiner.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{addr, all_list_all, eventually, listed, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_daemons_find_each_other_and_survive_the_seed() {
    let dirs: Vec<_> = (0..9).map(|_| tempfile::tempdir().unwrap()).collect();
    let seed = start(dirs[0].path(), vec![]).await;
    let seed_addr = addr(&seed, "quic-v1").await;
    let mut others = Vec::new();
    for d in &dirs[1..8] {
        others.push(start(d.path(), vec![seed_addr.clone()]).await);
    }
    {
        let mut all: Vec<&potluck_daemon::Node> = vec![&seed];
        all.extend(others.iter());
        assert!(
            eventually(Duration::from_secs(20), || all_list_all(&all)).await,
            "not every daemon listed every other within 20 s"
        );
    }
    // Every listed peer carries a capability record with measured figures.
    let peers = others[0].client().peers().await.unwrap();
    for p in peers.iter().filter(|p| p.record.is_some()) {
        let caps = &p.record.as_ref().unwrap().capabilities;
        assert!(caps.cpu_count >= 1 && caps.memory_bytes > 0);
    }

    seed.shutdown().await;
    let rest: Vec<&potluck_daemon::Node> = others.iter().collect();
    // Give the survivors time to notice, then they must still list each other.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        eventually(Duration::from_secs(10), || all_list_all(&rest)).await,
        "survivors lost each other after the seed died"
    );

    let via = addr(&others[3], "tcp").await;
    let late = start(dirs[8].path(), vec![via]).await;
    let late_id = late.client().local_peer_id();
    let found = eventually(Duration::from_secs(20), || async {
        for n in &others {
            if !listed(n).await.contains(&late_id) {
                return false;
            }
        }
        true
    })
    .await;
    assert!(found, "the late joiner was not found by every survivor");
    // ...and the late joiner learns all of them.
    let ids: Vec<_> = others.iter().map(|n| n.client().local_peer_id()).collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let seen = listed(&late).await;
            ids.iter().all(|id| seen.contains(id))
        })
        .await,
        "the late joiner did not learn every survivor"
    );
    late.shutdown().await;
    for n in others {
        n.shutdown().await;
    }
}
