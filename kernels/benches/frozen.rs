//! `frozen_matmul` against candle's matmul in a training step: forward and backward of
//! `y = x·Wᵀ` for MiniLM's linear shapes (a batch of 32 × 64 tokens), W frozen, x needing a
//! gradient, measured side by side in one run. `cargo bench -p fedpool-kernels --bench frozen`.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use fedpool_kernels::frozen_matmul;

fn time(mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let dev = Device::Cpu;
    let rows = 32 * 64;
    println!("| linear (d_in → d_out), {rows} rows | candle matmul fwd+bwd ms | frozen_matmul fwd+bwd ms | speed-up |");
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
