// Draft tree construction for MLX's CUDA backend (mx.fast.cuda_kernel, compiled by NVRTC).
//
// The best-first pops of engine/decode/tree.best_first and the verify rows of tree.build_tree, in one
// thread, on the device: a tree cycle then launches its draft, its tree and its verify without the host
// sync between them that reading the candidates costs (on an H100, a 16-node tree cycle took 12.9-15.8 ms
// against 7-9 ms for a chain cycle; the build itself is a few microseconds of work).
//
//   inputs: ids (L, K) int32 and lp (L, K) float32, each position's candidates best first
//           (tree.top_candidates); dims (4,) int32 = L, K, budget N, scored S (S >= N pops are scored).
//   outputs: tokens (N) int32, parents (N) int32 (verify rows, 0 = the root), depths (N) int32 (1..L),
//            pops (N) int32 (each row's place in best-first order), bits (N + 1, 4) uint32 (ancestors or
//            self), ancestors (N + 1, N + 1) uint8 (the same as a matrix), scores (S) float32 (the first S
//            pops' path log-probs), spine (1) int32 (rows 1..spine are the top-1 chain).
//   SPINE (bool template constant): the top-1 chain pops first (tree.SPINE_BONUS).
//
// Pop order is exactly Python's: scores are summed in double in the same order, ties go to the
// lexicographically smaller rank path, so the rows equal build_tree's (checked at first use).
// L <= 32, K <= 255, S <= 127.
//
// The loader splits this file at the two markers: the header goes before the generated signature,
// the body inside it.

//@header
#define TB_MAX_POPS 127
#define TB_MAX_DEPTH 32
#define TB_MAX_NODES (2 * TB_MAX_POPS + 1)

// a < b as Python compares (-(score + bonus), ranks): key first, then the rank paths lexicographically
__device__ __forceinline__ bool tb_less(double ka, const unsigned char* ra, int da, double kb,
                                        const unsigned char* rb, int db) {
  if (ka != kb) return ka < kb;
  int n = da < db ? da : db;
  for (int i = 0; i < n; ++i) {
    if (ra[i] != rb[i]) return ra[i] < rb[i];
  }
  return da < db;
}

//@source
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const int L = dims[0], K = dims[1], N = dims[2], S = dims[3];
  // every node ever pushed: its path's ranks, depth, score, key and whether it is still open
  unsigned char ranks[TB_MAX_NODES][TB_MAX_DEPTH];
  double score[TB_MAX_NODES], key[TB_MAX_NODES];
  int depth[TB_MAX_NODES];
  bool open[TB_MAX_NODES];
  int popped[TB_MAX_POPS];  // node of each pop
  int nodes = 0;

  // the root's first child: depth 1, rank 0
  ranks[0][0] = 0;
  depth[0] = 1;
  score[0] = (double)lp[0];
  key[0] = -(score[0] + (SPINE ? 1e3 : 0.0));
  open[0] = true;
  nodes = 1;
  int count = 0;
  while (count < S) {
    int best = -1;
    for (int n = 0; n < nodes; ++n) {
      if (open[n] && (best < 0 || tb_less(key[n], ranks[n], depth[n], key[best], ranks[best], depth[best]))) {
        best = n;
      }
    }
    if (best < 0) break;
    open[best] = false;
    popped[count++] = best;
    const int d = depth[best] - 1;
    const int r = ranks[best][d];
    if (r + 1 < K) {  // the next sibling
      int n = nodes++;
      for (int i = 0; i < d; ++i) ranks[n][i] = ranks[best][i];
      ranks[n][d] = (unsigned char)(r + 1);
      depth[n] = d + 1;
      score[n] = score[best] - (double)lp[d * K + r] + (double)lp[d * K + r + 1];
      bool chain = false;  // a sibling is never on the top-1 chain
      key[n] = -(score[n] + (SPINE && chain ? 1e3 : 0.0));
      open[n] = true;
    }
    if (d + 1 < L) {  // the first child
      int n = nodes++;
      bool chain = true;
      for (int i = 0; i <= d; ++i) {
        ranks[n][i] = ranks[best][i];
        chain = chain && ranks[best][i] == 0;
      }
      ranks[n][d + 1] = 0;
      depth[n] = d + 2;
      score[n] = score[best] + (double)lp[(d + 1) * K];
      key[n] = -(score[n] + (SPINE && chain ? 1e3 : 0.0));
      open[n] = true;
    }
  }
  for (int i = 0; i < S; ++i) scores[i] = i < count ? (float)score[popped[i]] : 0.0f;

  // rows: the chosen pops on the top-1 chain (in depth order), then the others in pop order
  int order[TB_MAX_POPS];
  int rows = 0, chain_rows = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (int i = 0; i < N; ++i) {
      const int n = popped[i];
      bool chain = true;
      for (int j = 0; j < depth[n]; ++j) chain = chain && ranks[n][j] == 0;
      if (chain == (pass == 0)) order[rows++] = i;
    }
    if (pass == 0) chain_rows = rows;
  }
  spine[0] = chain_rows;
  unsigned int row_bits[TB_MAX_POPS + 1][4];
  for (int w = 0; w < 4; ++w) row_bits[0][w] = 0u;
  row_bits[0][0] = 1u;
  for (int row = 1; row <= N; ++row) {
    const int i = order[row - 1];
    const int n = popped[i];
    const int d = depth[n];
    int parent = 0;
    if (d > 1) {  // the row of the pop whose path is this one's without its last rank
      for (int other = 1; other <= N && parent == 0; ++other) {
        const int m = popped[order[other - 1]];
        if (depth[m] != d - 1) continue;
        bool same = true;
        for (int j = 0; j < d - 1; ++j) same = same && ranks[m][j] == ranks[n][j];
        if (same) parent = other;
      }
    }
    tokens[row - 1] = ids[(d - 1) * K + ranks[n][d - 1]];
    parents[row - 1] = parent;
    depths[row - 1] = d;
    pops[row - 1] = i;
    for (int w = 0; w < 4; ++w) row_bits[row][w] = row_bits[parent][w];
    row_bits[row][row / 32] |= 1u << (row % 32);
  }
  for (int row = 0; row <= N; ++row) {
    for (int w = 0; w < 4; ++w) bits[row * 4 + w] = row_bits[row][w];
    for (int col = 0; col <= N; ++col) {
      ancestors[row * (N + 1) + col] = (unsigned char)((row_bits[row][col / 32] >> (col % 32)) & 1u);
    }
  }
