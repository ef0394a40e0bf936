// The input of a CPU-adapter matvec or matmul (ops.py, cpu_kernels.py) into an rgba32float
// texture, 4 elements a texel (the kernel then reads 4 inputs with one textureLoad); workgroup t
// does token t (row t of the texture, x rows x_stride apart; a matvec has one):
//   xt[i, t] = xin[4i .. 4i + 3], i < k / 4, where by MODE, with x_t = x[x_off + t * x_stride ..]
//     0: xin = x_t
//     1: xin = rmsnorm(x_t[0 .. k]) * nw          (x / sqrt(mean(x^2) + eps) * nw, as rmsnorm.wgsl)
//     2: xin = silu(x_t) * x[up_off + t * x_stride ..]   (SwiGLU, as silu_mul.wgsl)
// A workgroup of WG invocations per token, no shared memory or barriers (emulated on CPUs): in
// MODE 1 every invocation sums all k squares itself. k % 4 == 0. Grid: (n_tokens).

override MODE: u32 = 0u;
override WG: u32 = 4u;

struct Params { k: u32, x_off: u32, up_off: u32, eps: f32, x_stride: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> nw: array<f32>;
@group(0) @binding(3) var xt: texture_storage_2d<rgba32float, write>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let t = wg.x;
  let x0 = p.x_off + t * p.x_stride;
  var scale = 1.0;
  if (MODE == 1u) {
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < p.k; i += 4u) {
      let v = vec4<f32>(x[x0 + i], x[x0 + i + 1u], x[x0 + i + 2u], x[x0 + i + 3u]);
      s += v * v;
    }
    scale = inverseSqrt(((s.x + s.y) + (s.z + s.w)) / f32(p.k) + p.eps);
  }
  for (var i = lid; i < p.k / 4u; i += WG) {
    let b = x0 + 4u * i;
    var v = vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]);
    if (MODE == 1u) {
      v = v * scale * vec4<f32>(nw[4u * i], nw[4u * i + 1u], nw[4u * i + 2u], nw[4u * i + 3u]);
    } else if (MODE == 2u) {
      let ub = p.up_off + t * p.x_stride + 4u * i;
      // exp(-v) overflows to inf for v < -88: v / inf = -0, the correct limit
      v = v / (1.0 + exp(-v)) * vec4<f32>(x[ub], x[ub + 1u], x[ub + 2u], x[ub + 3u]);
    }
    textureStore(xt, vec2<i32>(i32(i), i32(t)), v);
  }
}
