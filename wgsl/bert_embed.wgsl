// BERT input embeddings, before their LayerNorm (layernorm.wgsl):
//   out[r, j] = word[ids[r], j] + pos[r % seq_len, j] + types[type_ids[r], j]
// for the n_rows = n_seq * seq_len rows of a padded batch (row r is token r % seq_len of
// sequence r / seq_len: positions restart at 0 in every sequence, as HF's default
// position_ids). Tables are [*, dim] f32 row-major; ids are validated by the caller (a wrong
// id would read another row, or zeros past the end, not fail). Summed in that order, as
// NumpyBert does, so the two agree bit for bit.
// One thread per output element. Grid: (min(G, 65535), ceil(G / 65535)),
// G = ceil(n_rows * dim / WG).

override WG: u32 = 256u;

struct Params { n_rows: u32, seq_len: u32, dim: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> type_ids: array<u32>;
@group(0) @binding(3) var<storage, read> word: array<f32>;
@group(0) @binding(4) var<storage, read> pos: array<f32>;
@group(0) @binding(5) var<storage, read> types: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let g = (wg.x + wg.y * nwg.x) * WG + lid;
  if (g >= p.n_rows * p.dim) { return; }
  let r = g / p.dim;
  let j = g % p.dim;
  out[g] = (word[ids[r] * p.dim + j] + pos[(r % p.seq_len) * p.dim + j]) + types[type_ids[r] * p.dim + j];
}
