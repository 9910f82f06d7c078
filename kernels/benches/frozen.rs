//! The backbone's linear layers, measured side by side in one run
//! (`cargo bench -p fedpool-kernels --bench frozen`; with `FEDPOOL_TORCH_VENV=DIR`, a venv with
//! torch, also PyTorch's matmul on the same shapes and threads):
//! 1. matmul rates on MiniLM's linear shapes (2,048 rows = a batch of 32 × 64 tokens): candle's
//!    matmul (the `gemm` crate) against `dense::matmul` (faer), GFLOP/s, best of 3 × 5;
//! 2. `frozen_matmul` against candle's matmul in a training step: forward and backward of
//!    `y = x·Wᵀ`, W frozen, x needing a gradient.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use fedpool_kernels::{dense, frozen_matmul};

const SHAPES: [(usize, usize, usize); 3] = [(2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384)];

fn time(mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// PyTorch's matmul rate (GFLOP/s) on each shape, when a venv is named.
fn torch_rates(threads: usize) -> Option<Vec<f64>> {
    let venv = std::env::var_os("FEDPOOL_TORCH_VENV")?;
    let script = format!(
        "import torch, time\ntorch.set_num_threads({threads})\nfor m, k, n in {SHAPES:?}:\n    a = torch.randn(m, k); b = torch.randn(k, n); c = torch.empty(m, n)\n    best = 1e9\n    for _ in range(3):\n        t = time.perf_counter()\n        for _ in range(5): torch.matmul(a, b, out=c)\n        best = min(best, (time.perf_counter() - t) / 5)\n    print(2 * m * k * n / best / 1e9)\n"
    );
    let out = std::process::Command::new(std::path::Path::new(&venv).join("bin/python"))
        .args(["-c", &script])
        .output()
        .ok()?;
    let rates: Vec<f64> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect();
    (rates.len() == SHAPES.len()).then_some(rates)
}

fn main() {
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    println!("### Matmul rates, GFLOP/s ({threads} threads, best of 3 × 5)\n");
    println!("| m × k × n | candle matmul (gemm) | dense::matmul (faer) | PyTorch |");
    println!("| --- | ---: | ---: | ---: |");
    let mut ours = Vec::new();
    for (m, k, n) in SHAPES {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).expect("a");
        let b = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("b").t().expect("transpose"); // as Wᵀ
        let flops = 2.0 * (m * k * n) as f64;
        let best = |f: &dyn Fn()| (0..3).map(|_| time(f)).fold(f64::MAX, f64::min);
        let candle = flops / best(&|| drop(a.matmul(&b).expect("matmul"))) / 1e9;
        let faer = flops / best(&|| drop(dense::matmul(&a, &b, None).expect("dense"))) / 1e9;
        ours.push((m, k, n, candle, faer));
    }
    let torch = torch_rates(threads);
    for (i, (m, k, n, candle, faer)) in ours.into_iter().enumerate() {
        let t = torch.as_ref().map_or("—".into(), |r| format!("{:.1}", r[i]));
        println!("| {m} × {k} × {n} | {candle:.1} | {faer:.1} | {t} |");
    }

    let rows = 32 * 64;
    println!("\n### frozen_matmul in a training step, {rows} rows\n");
    println!("| linear (d_in → d_out) | candle matmul fwd+bwd ms | frozen_matmul fwd+bwd ms | speed-up |");
    println!("| --- | ---: | ---: | ---: |");
    for (d_in, d_out) in [(384usize, 384usize), (384, 1536), (1536, 384)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, d_in), &dev).expect("x")).expect("var");
        let w = Tensor::randn(0f32, 0.05, (d_out, d_in), &dev).expect("w");
        let wt = w.t().expect("transpose");
        let step = |frozen: bool| {
            let y = if frozen { frozen_matmul(x.as_tensor(), &wt) } else { x.as_tensor().matmul(&wt) }.expect("matmul");
            let grads = y.sqr().expect("sqr").sum_all().expect("sum").backward().expect("backward");
            assert!(grads.get(x.as_tensor()).is_some());
        };
        let plain = time(|| step(false));
        let frozen = time(|| step(true));
        println!("| {d_in} → {d_out} | {:.1} | {:.1} | {:.2}× |", plain * 1e3, frozen * 1e3, plain / frozen);
    }
}
