// C = A · B, row-major f32: A [m, k], B [k, n], C [m, n].
// 16x16 output tile per workgroup; A and B tiles staged in workgroup memory over k.
// Grid: (ceil(n / 16), ceil(m / 16)).

struct Params { m: u32, n: u32, k: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const T: u32 = 16u;
var<workgroup> ta: array<f32, 256>;  // [T rows of A][T k]
var<workgroup> tb: array<f32, 256>;  // [T k][T cols of B]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let row = wg.y * T + lid.y;
  let col = wg.x * T + lid.x;
  var acc = 0.0;
  for (var k0 = 0u; k0 < p.k; k0 += T) {
    let ka = k0 + lid.x;
    let kb = k0 + lid.y;
    ta[lid.y * T + lid.x] = select(0.0, a[row * p.k + ka], row < p.m && ka < p.k);
    tb[lid.y * T + lid.x] = select(0.0, b[kb * p.n + col], kb < p.k && col < p.n);
    workgroupBarrier();
    for (var i = 0u; i < T; i++) {
      acc += ta[lid.y * T + i] * tb[i * T + lid.x];
    }
    workgroupBarrier();
  }
  if (row < p.m && col < p.n) {
    c[row * p.n + col] = acc;
  }
}
