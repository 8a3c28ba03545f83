//! The NCCL communicator on the GPU: a world of one from the launcher path (rendezvous included), and, where
//! the machine has two or more GPUs, one rank per GPU in threads against the loopback group's sums. NCCL needs
//! libnccl.so.2 on the loader path (the PyTorch wheels ship it under nvidia/nccl/lib). Without a GPU the test
//! prints `skipped: no CUDA device`; without NCCL or a second GPU it says so.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::{device, say, Report};
use eqat::dist::launch::LaunchEnv;
use eqat::dist::loopback;
use eqat::dist::nccl::NcclComm;
use eqat::dist::Communicator;
use eqat::gpu::GpuContext;
use eqat::testing::to_f64;
use std::time::Duration;

fn buffers(world: usize, n: usize) -> Vec<Vec<f32>> {
    (0..world)
        .map(|r| {
            (0..n)
                .map(|i| ((i * 7 + r * 13) % 29) as f32 * 0.25 - 3.0)
                .collect()
        })
        .collect()
}

/// Every rank's collectives on its own thread (NCCL blocks until all ranks have called): all-reduce, then a
/// broadcast from the last rank, then a barrier.
fn collectives<C: Communicator>(comms: Vec<C>, n: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    let world = comms.len();
    let inputs = buffers(world, n);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(inputs)
            .map(|(c, mut buf)| {
                s.spawn(move || {
                    c.all_reduce_sum(&mut buf).unwrap();
                    let mut b = vec![c.rank() as f32; 5];
                    c.broadcast(&mut b, world - 1).unwrap();
                    c.barrier().unwrap();
                    (buf, b)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn nccl_collectives_match_the_loopback_group() {
    let Some(ctx) = device("nccl") else { return };
    let mut r = Report::new("nccl");
    let env = LaunchEnv::from_vars(|k| match k {
        "RANK" => Some("0".into()),
        "WORLD_SIZE" => Some("1".into()),
        _ => None,
    })
    .unwrap();
    let one = match NcclComm::from_launch(&env, &ctx, Duration::from_secs(30)) {
        Ok(c) => c,
        Err(e) => {
            say(&format!("nccl: skipped: NCCL could not start: {e}"));
            return;
        }
    };
    let mut buf = buffers(1, 1000).remove(0);
    let want = to_f64(&buf);
    one.all_reduce_sum(&mut buf).unwrap();
    r.check_tol(
        "world of 1: all-reduce is the identity",
        &buf,
        &want,
        0.0,
        0.0,
    );
    r.expect(
        "world of 1: broadcast from rank 1 is an error",
        one.broadcast(&mut buf, 1).is_err(),
    );
    r.expect("world of 1: barrier", one.barrier().is_ok());
    r.expect(
        "a unique id of the wrong length is an error naming both lengths",
        matches!(NcclComm::from_id(&ctx, 0, 1, &[0u8; 5]), Err(e) if e.to_string().contains("5 bytes, expected 128")),
    );

    let gpus: Vec<_> = (0..8).map_while(|i| GpuContext::new(i).ok()).collect();
    if gpus.len() < 2 {
        say("nccl: several ranks: skipped: this machine has 1 GPU (NCCL refuses two ranks on one GPU)");
        r.finish();
        return;
    }
    let mut worlds = vec![2, gpus.len()];
    worlds.dedup();
    for world in worlds {
        let n = 100_003;
        let nccl = collectives(NcclComm::group(&gpus[..world]).unwrap(), n);
        let lo = collectives(loopback::group(world, Duration::from_secs(30)).unwrap(), n);
        for (rank, ((g, gb), (l, lb))) in nccl.iter().zip(&lo).enumerate() {
            r.check_tol(
                &format!("world {world} rank {rank}: all-reduce"),
                g,
                &to_f64(l),
                1e-6,
                1e-6,
            );
            r.check_tol(
                &format!("world {world} rank {rank}: broadcast"),
                gb,
                &to_f64(lb),
                0.0,
                0.0,
            );
        }
    }
    r.finish();
}
