use super::*;
use std::collections::HashMap;

fn env(vars: &[(&str, &str)]) -> Result<LaunchEnv> {
    let m: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    LaunchEnv::from_vars(|k| m.get(k).cloned())
}

#[test]
fn reads_torchrun_slurm_and_single() {
    let t = env(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node7"),
        ("MASTER_PORT", "29500"),
    ])
    .unwrap();
    assert_eq!(
        t,
        LaunchEnv {
            launcher: Launcher::Torchrun,
            rank: 3,
            world_size: 4,
            local_rank: Some(1),
            master: Some(("node7".into(), 29500)),
        }
    );
    let s = env(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
    ])
    .unwrap();
    assert_eq!(
        (s.launcher, s.rank, s.world_size, s.local_rank),
        (Launcher::Slurm, 5, 8, Some(1))
    );
    assert_eq!(s.master, None);
    // torchrun started by srun with one task per node: torchrun's variables describe the job.
    let both = env(&[
        ("RANK", "2"),
        ("WORLD_SIZE", "4"),
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
    ])
    .unwrap();
    assert_eq!((both.launcher, both.rank), (Launcher::Torchrun, 2));
    let one = env(&[]).unwrap();
    assert_eq!(
        (one.launcher, one.rank, one.world_size),
        (Launcher::Single, 0, 1)
    );
}

#[test]
fn inconsistent_values_name_the_variables() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("RANK", "4"), ("WORLD_SIZE", "4")],
            "RANK=4 with WORLD_SIZE=4",
        ),
        (&[("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE=0"),
        (&[("RANK", "1")], "RANK and WORLD_SIZE"),
        (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=\"x\""),
        (
            &[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "2")],
            "LOCAL_RANK=2",
        ),
        (
            &[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "2")],
            "SLURM_PROCID=2 with SLURM_NTASKS=2",
        ),
        (&[("SLURM_PROCID", "0")], "SLURM_NTASKS"),
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("SLURM_NTASKS", "3")],
            "SLURM_NTASKS=3",
        ),
        (&[("MASTER_ADDR", "h")], "MASTER_ADDR and MASTER_PORT"),
        (
            &[("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")],
            "MASTER_PORT=\"70000\"",
        ),
    ];
    for (vars, want) in cases {
        let e = env(vars).unwrap_err().to_string();
        assert!(e.contains(want), "{vars:?}: {e}");
    }
}

#[test]
fn tcp_rendezvous_hands_rank_0s_blob_to_every_rank() {
    for world in [2, 4] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let blob: Vec<u8> = (0..128u8).map(|i| i.wrapping_mul(37)).collect();
        let got = std::thread::scope(|s| {
            let joins: Vec<_> = (1..world)
                .map(|r| {
                    let addr = addr.clone();
                    s.spawn(move || join(&addr, r, Duration::from_secs(20)))
                })
                .collect();
            serve(&listener, world, &blob, Duration::from_secs(20)).unwrap();
            joins
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(got.len(), world - 1);
        assert!(got.iter().all(|b| b == &blob));
    }
}

#[test]
fn tcp_rendezvous_through_the_environment() {
    // Find a free port, then let rank 0 bind it itself from MASTER_ADDR/MASTER_PORT.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let envs: Vec<LaunchEnv> = (0..3)
        .map(|r| LaunchEnv {
            launcher: Launcher::Torchrun,
            rank: r,
            world_size: 3,
            local_rank: Some(r),
            master: Some(("127.0.0.1".into(), port)),
        })
        .collect();
    let got: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = envs
            .iter()
            .map(|e| {
                let mine = if e.rank == 0 {
                    b"nccl-id".to_vec()
                } else {
                    Vec::new()
                };
                s.spawn(move || tcp_rendezvous(e, &mine, Duration::from_secs(20)).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|b| b == b"nccl-id"));
    let no_master = LaunchEnv {
        master: None,
        ..envs[1].clone()
    };
    assert!(tcp_rendezvous(&no_master, &[], Duration::from_secs(1))
        .unwrap_err()
        .to_string()
        .contains("MASTER_ADDR"));
}

#[test]
fn tcp_rendezvous_times_out_naming_the_missing_ranks() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let e = serve(&listener, 3, b"x", Duration::from_millis(200))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[1, 2] never connected"), "{e}");
    let dead = listener.local_addr().unwrap().to_string();
    drop(listener);
    let e = join(&dead, 1, Duration::from_millis(200))
        .unwrap_err()
        .to_string();
    assert!(e.contains("could not reach rank 0"), "{e}");
}

#[test]
fn tcp_rendezvous_refuses_a_duplicate_rank() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let e = std::thread::scope(|s| {
        let a = addr.clone();
        s.spawn(move || join(&a, 1, Duration::from_secs(5)));
        let a = addr.clone();
        s.spawn(move || join(&a, 1, Duration::from_secs(5)));
        serve(&listener, 3, b"x", Duration::from_secs(5))
            .unwrap_err()
            .to_string()
    });
    assert!(e.contains("claims rank 1"), "{e}");
}

#[test]
fn file_rendezvous_polls_until_rank_0_writes() {
    let dir = std::env::temp_dir().join(format!("eqat-rdv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nccl_id");
    let _ = std::fs::remove_file(&path);
    let got = std::thread::scope(|s| {
        let hs: Vec<_> = (1..3)
            .map(|r| {
                let p = path.clone();
                s.spawn(move || file_rendezvous(&p, r, &[], Duration::from_secs(20)).unwrap())
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        file_rendezvous(&path, 0, b"blob-0", Duration::from_secs(20)).unwrap();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(got.iter().all(|b| b == b"blob-0"));
    let e = file_rendezvous(&dir.join("never"), 1, &[], Duration::from_millis(100))
        .unwrap_err()
        .to_string();
    assert!(e.contains("did not appear"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
