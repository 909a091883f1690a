#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "attention_step.h"
#include "expert_ffn.h"
#include "linear.h"
#include "register.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace moeedge {

namespace {

// Wall time callers spent inside the compute kernels, summed over calls (a harness divides it
// by a token's time: what is neither a kernel nor a wait for a read is overhead).
std::atomic<int64_t> g_kernel_ns{0};

// Counts the scope it lives in into g_kernel_ns; declared after the GIL is released.
struct KernelBusy {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  ~KernelBusy() {
    g_kernel_ns.fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count(),
        std::memory_order_relaxed);
  }
};

// A C-contiguous 2-D buffer of `itemsize`-byte items; ValueError naming `what` otherwise.
py::buffer_info matrix(const py::buffer& b, py::ssize_t itemsize, bool writable, const char* what) {
  py::buffer_info info = b.request(writable);
  if (info.ndim != 2 || info.itemsize != itemsize)
    throw std::invalid_argument(std::string(what) + " must be a 2-D array of " + std::to_string(itemsize) +
                                "-byte items, got " + std::to_string(info.ndim) + "-D of " +
                                std::to_string(info.itemsize) + "-byte items");
  if (info.strides[1] != itemsize || info.strides[0] != info.shape[1] * itemsize)
    throw std::invalid_argument(std::string(what) + " must be C-contiguous");
  return info;
}

bool contiguous(const py::buffer_info& info) {
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
    if (info.shape[i] != 1 && info.strides[i] != expected) return false;
    expected *= info.shape[i];
  }
  return true;
}

using QuantLinear = void (*)(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                             int threads);

// out = x @ dequant(w).T for one GGUF block format; w is its raw blocks, [out, in] row-major.
void def_quant_linear(py::module_& m, const char* name, const std::string& label, py::ssize_t block,
                      py::ssize_t block_bytes, QuantLinear fn) {
  m.def(
      name,
      [label, block, block_bytes, fn](const py::buffer& x, const py::buffer& w, const py::buffer& out, int threads) {
        auto xi = matrix(x, 4, false, "x (float32 [tokens, in])");
        auto wi = w.request();
        auto oi = matrix(out, 4, true, "out (float32 [tokens, out])");
        const py::ssize_t rows = oi.shape[1], cols = xi.shape[1];
        if (cols % block != 0)
          throw std::invalid_argument(label + " rows must hold whole " + std::to_string(block) +
                                      "-weight blocks, got in = " + std::to_string(cols));
        if (oi.shape[0] != xi.shape[0])
          throw std::invalid_argument("x has " + std::to_string(xi.shape[0]) + " tokens but out has " +
                                      std::to_string(oi.shape[0]));
        const py::ssize_t need = rows * (cols / block) * block_bytes;
        if (wi.size * wi.itemsize != need)
          throw std::invalid_argument("w holds " + std::to_string(wi.size * wi.itemsize) + " bytes; " + label + " [" +
                                      std::to_string(rows) + ", " + std::to_string(cols) + "] needs " +
                                      std::to_string(need));
        if (!contiguous(wi)) throw std::invalid_argument("w must be C-contiguous");
        py::gil_scoped_release release;
        KernelBusy busy;
        fn(static_cast<const float*>(xi.ptr), xi.shape[0], static_cast<const uint8_t*>(wi.ptr), rows, cols,
           static_cast<float*>(oi.ptr), threads);
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("threads") = 0,
      ("out = x @ dequant(w).T with w GGUF " + label +
       " blocks read as stored (GIL released; threads=0: all cores).").c_str());
}

using GroupLinear = void (*)(const float* x, size_t tokens, const uint8_t* q, const uint8_t* scales, size_t rows,
                            size_t cols, size_t group, float* out, int threads);

// A C-contiguous buffer of exactly `need` bytes; ValueError naming `what` and `layout` otherwise.
py::buffer_info bytes_of(const py::buffer& b, py::ssize_t need, const std::string& what, const std::string& layout) {
  py::buffer_info info = b.request();
  if (info.size * info.itemsize != need)
    throw std::invalid_argument(what + " holds " + std::to_string(info.size * info.itemsize) + " bytes; " + layout +
                                " needs " + std::to_string(need));
  if (!contiguous(info)) throw std::invalid_argument(what + " must be C-contiguous");
  return info;
}

// out = x @ (scales * q).T for moeedge's group-wise int8 or int4 (layout in linear.h).
void def_group_linear(py::module_& m, const char* name, int bits, GroupLinear fn) {
  const std::string label = "int" + std::to_string(bits);
  m.def(
      name,
      [label, bits, fn](const py::buffer& x, const py::buffer& qweight, const py::buffer& scales, const py::buffer& out,
                        py::ssize_t group, int threads) {
        auto xi = matrix(x, 4, false, "x (float32 [tokens, in])");
        auto oi = matrix(out, 4, true, "out (float32 [tokens, out])");
        const py::ssize_t rows = oi.shape[1], cols = xi.shape[1];
        if (group <= 0 || group % 32 != 0)
          throw std::invalid_argument("group must be a positive multiple of 32, got " + std::to_string(group));
        if (cols % 32 != 0)
          throw std::invalid_argument(label + " rows must hold whole 32-weight blocks, got in = " +
                                      std::to_string(cols));
        if (oi.shape[0] != xi.shape[0])
          throw std::invalid_argument("x has " + std::to_string(xi.shape[0]) + " tokens but out has " +
                                      std::to_string(oi.shape[0]));
        const std::string shape = "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
        const py::ssize_t groups = (cols + group - 1) / group;
        auto qi = bytes_of(qweight, rows * cols * bits / 8, "qweight", label + " " + shape);
        auto si = bytes_of(scales, rows * groups * 2, "scales",
                           "fp16 [" + std::to_string(rows) + ", " + std::to_string(groups) + "] (group " +
                               std::to_string(group) + ")");
        py::gil_scoped_release release;
        KernelBusy busy;
        fn(static_cast<const float*>(xi.ptr), xi.shape[0], static_cast<const uint8_t*>(qi.ptr),
           static_cast<const uint8_t*>(si.ptr), rows, cols, group, static_cast<float*>(oi.ptr), threads);
      },
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("out"), py::arg("group"), py::arg("threads") = 0,
      ("out = x @ (scales * q).T with q moeedge's group-wise " + label +
       " read as stored (GIL released; threads=0: all cores).").c_str());
}

StoredMatrix stored_matrix(const std::string& format, py::ssize_t offset, py::ssize_t rows, py::ssize_t cols,
                           py::ssize_t group, const char* role) {
  if (offset < 0 || rows <= 0 || cols <= 0 || group < 0)
    throw std::invalid_argument(std::string(role) + ": offset, rows, cols and group must be non-negative (rows and "
                                "cols positive), got " + std::to_string(offset) + ", " + std::to_string(rows) +
                                ", " + std::to_string(cols) + ", " + std::to_string(group));
  StoredMatrix sm{weight_format(format), static_cast<size_t>(offset), static_cast<size_t>(rows),
                  static_cast<size_t>(cols), static_cast<size_t>(group)};
  try {
    sm.nbytes();
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string(role) + ": " + e.what());
  }
  return sm;
}

struct ExpertFfn {
  StoredMatrix gate, up, down;
};

using MatrixArgs = std::tuple<std::string, py::ssize_t, py::ssize_t, py::ssize_t, py::ssize_t>;

void def_expert_ffn(py::module_& m) {
  py::class_<ExpertFfn>(m, "ExpertFfn",
                        "Where an expert's gate, up and down matrices lie in its bytes, each (format, offset, "
                        "rows, cols, group): format 'bf16', 'q8_0', 'q4_0', 'q4_k', 'q5_k', 'q6_k', 'int8' or 'int4' "
                        "(group: int8/int4's, else 0). Call it as ffn(x, expert, out, scale=1.0, threads=0): "
                        "out = scale * down(silu(gate(x)) * up(x)), x float32 [tokens, in], out float32 "
                        "[tokens, out], expert the expert's bytes (an ExpertBuffer); GIL released.")
      .def(py::init([](const MatrixArgs& g, const MatrixArgs& u, const MatrixArgs& d) {
             const auto make = [](const MatrixArgs& a, const char* role) {
               return stored_matrix(std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<3>(a), std::get<4>(a),
                                    role);
             };
             ExpertFfn f{make(g, "gate"), make(u, "up"), make(d, "down")};
             check_chain(f.gate, f.up, f.down);
             return f;
           }),
           py::arg("gate"), py::arg("up"), py::arg("down"))
      .def(
          "__call__",
          [](const ExpertFfn& f, const py::buffer& x, const py::buffer& expert, const py::buffer& out, float scale,
             int threads) {
            auto xi = matrix(x, 4, false, "x (float32 [tokens, in])");
            auto oi = matrix(out, 4, true, "out (float32 [tokens, out])");
            py::buffer_info ei = expert.request();
            if (!contiguous(ei)) throw std::invalid_argument("expert bytes must be C-contiguous");
            if (static_cast<size_t>(xi.shape[1]) != f.gate.cols || oi.shape[0] != xi.shape[0] ||
                static_cast<size_t>(oi.shape[1]) != f.down.rows)
              throw std::invalid_argument("shapes do not fit: x [" + std::to_string(xi.shape[0]) + ", " +
                                          std::to_string(xi.shape[1]) + "], out [" + std::to_string(oi.shape[0]) +
                                          ", " + std::to_string(oi.shape[1]) + "] for an expert " +
                                          std::to_string(f.gate.cols) + " -> " + std::to_string(f.down.rows));
            py::gil_scoped_release release;
            KernelBusy busy;
            expert_ffn(static_cast<const float*>(xi.ptr), xi.shape[0], static_cast<const uint8_t*>(ei.ptr),
                       ei.size * ei.itemsize, f.gate, f.up, f.down, scale, static_cast<float*>(oi.ptr), threads);
          },
          py::arg("x"), py::arg("expert"), py::arg("out"), py::arg("scale") = 1.0f, py::arg("threads") = 0);
}

// A contiguous float32 buffer of exactly n values; ValueError naming `what` otherwise.
float* floats(const py::buffer& b, size_t n, bool writable, const std::string& what) {
  py::buffer_info info = b.request(writable);
  if (info.itemsize != 4 || info.format != py::format_descriptor<float>::format())
    throw std::invalid_argument(what + " must be float32");
  if (!contiguous(info)) throw std::invalid_argument(what + " must be C-contiguous");
  if (static_cast<size_t>(info.size) != n)
    throw std::invalid_argument(what + " has " + std::to_string(info.size) + " values, " + std::to_string(n) +
                                " expected");
  return static_cast<float*>(info.ptr);
}

// (format, buffer, rows, cols, group): a matrix as stored, its buffer exactly its bytes.
DenseMatrix dense_matrix(const py::handle& spec, const std::string& name, std::vector<py::object>& owners) {
  const auto t = spec.cast<py::tuple>();
  if (t.size() != 5) throw std::invalid_argument(name + " must be (format, buffer, rows, cols, group)");
  DenseMatrix m;
  m.layout = stored_matrix(t[0].cast<std::string>(), 0, t[2].cast<py::ssize_t>(), t[3].cast<py::ssize_t>(),
                           t[4].cast<py::ssize_t>(), name.c_str());
  const py::buffer buffer = t[1].cast<py::buffer>();
  auto info = bytes_of(buffer, static_cast<py::ssize_t>(m.layout.nbytes()), name,
                       t[0].cast<std::string>() + " [" + std::to_string(m.layout.rows) + ", " +
                           std::to_string(m.layout.cols) + "]");
  m.data = static_cast<const uint8_t*>(info.ptr);
  owners.push_back(buffer);  // the bytes stay alive as long as the step
  return m;
}

std::vector<float> vector_of(const py::dict& weights, const char* name) {
  if (!weights.contains(name) || weights[name].is_none()) return {};
  const py::buffer b = weights[name].cast<py::buffer>();
  py::buffer_info info = b.request();
  const float* p = floats(b, static_cast<size_t>(info.size), false, name);
  return std::vector<float>(p, p + info.size);
}

struct BoundAttention {
  std::unique_ptr<AttentionStep> step;
  std::vector<py::object> owners;  // the weights' and the KV cache's buffers
};

void def_attention_step(py::module_& m) {
  py::class_<BoundAttention>(
      m, "AttentionStep",
      "One token through a decoder layer's attention block (csrc/attention_step.h): pre-norm, q/k/v "
      "projections (+ biases, q/k norms, clamp), rotary embedding, the KV cache at pos, grouped-head attention, "
      "o projection added to h, then the post-attention norm and the router's logits. weights: 'q', 'k', "
      "'v', 'o' and optionally 'router' as (format, buffer, rows, cols, group); 'in_norm', 'post_norm' and "
      "optionally 'q_bias', 'k_bias', 'v_bias', 'q_norm', 'k_norm' as float32 buffers. k_cache, v_cache: "
      "this layer's float32 [capacity, kv_heads, head_dim], kept alive and written in place.")
      .def(py::init([](size_t hidden, size_t heads, size_t kv_heads, size_t head_dim, float eps, float clip,
                       const py::dict& weights, const py::buffer& k_cache, const py::buffer& v_cache) {
             auto bound = std::make_unique<BoundAttention>();
             AttentionWeights w;
             const auto matrix_of = [&](const char* name, bool required) {
               if (!weights.contains(name) || weights[name].is_none()) {
                 if (required) throw std::invalid_argument(std::string(name) + " is missing");
                 return DenseMatrix{};
               }
               return dense_matrix(weights[name], name, bound->owners);
             };
             w.q = matrix_of("q", true), w.k = matrix_of("k", true), w.v = matrix_of("v", true);
             w.o = matrix_of("o", true), w.router = matrix_of("router", false);
             w.in_norm = vector_of(weights, "in_norm"), w.post_norm = vector_of(weights, "post_norm");
             w.q_bias = vector_of(weights, "q_bias"), w.k_bias = vector_of(weights, "k_bias");
             w.v_bias = vector_of(weights, "v_bias");
             w.q_norm = vector_of(weights, "q_norm"), w.k_norm = vector_of(weights, "k_norm");
             AttentionShape shape{hidden, heads, kv_heads, head_dim, 0, eps, clip};
             const size_t per_position = kv_heads * head_dim;
             py::buffer_info ki = k_cache.request(true);
             if (per_position == 0 || ki.size == 0 || static_cast<size_t>(ki.size) % per_position != 0)
               throw std::invalid_argument("k_cache holds " + std::to_string(ki.size) +
                                           " values, not whole positions of kv_heads x head_dim = " +
                                           std::to_string(per_position));
             shape.capacity = static_cast<size_t>(ki.size) / per_position;
             float* k = floats(k_cache, ki.size, true, "k_cache");
             float* v = floats(v_cache, ki.size, true, "v_cache");
             bound->owners.push_back(k_cache);
             bound->owners.push_back(v_cache);
             bound->step = std::make_unique<AttentionStep>(shape, std::move(w), k, v);
             return bound;
           }),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("clip"), py::arg("weights"), py::arg("k_cache"), py::arg("v_cache"))
      .def_property_readonly("router_rows", [](const BoundAttention& b) { return b.step->router_rows(); })
      .def(
          "__call__",
          [](const BoundAttention& b, const py::buffer& h, size_t pos, const py::buffer& cos, const py::buffer& sin,
             const py::buffer& post, const py::object& logits, int threads) {
            const AttentionShape& s = b.step->shape();
            float* hp = floats(h, s.hidden, true, "h");
            const float* cp = floats(cos, s.head_dim, false, "cos");
            const float* sp = floats(sin, s.head_dim, false, "sin");
            float* pp = floats(post, s.hidden, true, "post");
            float* lp = nullptr;
            if (b.step->router_rows() > 0) {
              if (logits.is_none()) throw std::invalid_argument("this layer has a router: logits are needed");
              lp = floats(logits.cast<py::buffer>(), b.step->router_rows(), true, "logits");
            }
            py::gil_scoped_release release;
            KernelBusy busy;
            b.step->run(hp, pos, cp, sp, pp, lp, threads);
          },
          py::arg("h"), py::arg("pos"), py::arg("cos"), py::arg("sin"), py::arg("post"), py::arg("logits") = py::none(),
          py::arg("threads") = 0)
      .def_static(
          "rows",
          [](const std::vector<const BoundAttention*>& bound, const py::buffer& h, const std::vector<size_t>& pos,
             const py::buffer& cos, const py::buffer& sin, const py::buffer& post, const py::object& logits,
             int threads) {
            std::vector<const AttentionStep*> steps;
            for (const BoundAttention* b : bound) {
              if (!b) throw std::invalid_argument("step " + std::to_string(steps.size()) + " is None");
              steps.push_back(b->step.get());
            }
            if (steps.empty()) throw std::invalid_argument("rows needs one step per row, got none");
            if (pos.size() != steps.size())
              throw std::invalid_argument(std::to_string(steps.size()) + " steps but " + std::to_string(pos.size()) +
                                          " positions: one of each per row");
            const AttentionShape& s = steps[0]->shape();
            const size_t n = steps.size();
            const auto rows_of = [n](const char* what, size_t width) {
              return std::string(what) + " ([" + std::to_string(n) + " rows, " + std::to_string(width) + "])";
            };
            float* hp = floats(h, n * s.hidden, true, rows_of("h", s.hidden));
            const float* cp = floats(cos, n * s.head_dim, false, rows_of("cos", s.head_dim));
            const float* sp = floats(sin, n * s.head_dim, false, rows_of("sin", s.head_dim));
            float* pp = floats(post, n * s.hidden, true, rows_of("post", s.hidden));
            float* lp = nullptr;
            if (steps[0]->router_rows() > 0) {
              if (logits.is_none()) throw std::invalid_argument("this layer has a router: logits are needed");
              lp = floats(logits.cast<py::buffer>(), n * steps[0]->router_rows(), true,
                          rows_of("logits", steps[0]->router_rows()));
            }
            py::gil_scoped_release release;
            KernelBusy busy;
            AttentionStep::run_rows(steps, hp, pos.data(), cp, sp, pp, lp, threads);
          },
          py::arg("steps"), py::arg("h"), py::arg("pos"), py::arg("cos"), py::arg("sin"), py::arg("post"),
          py::arg("logits") = py::none(), py::arg("threads") = 0,
          "One token of each of several sequences through one layer's attention block in one call: steps[i] is "
          "the layer's AttentionStep on row i's KV slot (all with the same weights), h float32 [N, hidden] in "
          "place, pos N positions, cos and sin [N, head_dim], post [N, hidden], logits [N, router rows]. Each "
          "weight is read once for all rows; row i gets the bits steps[i](...) alone would give it.");
}

// out = x @ w.T with w [rows, cols] of `W` (bf16 as 2-byte items, or fp32) read as stored.
template <class W>
void def_dense_linear(py::module_& m, const char* name, const std::string& label,
                      void (*fn)(const float*, size_t, const W*, size_t, size_t, float*, int)) {
  m.def(
      name,
      [fn, label](const py::buffer& x, const py::buffer& w, const py::buffer& out, int threads) {
        auto xi = matrix(x, 4, false, "x (float32 [tokens, in])");
        auto wi = matrix(w, sizeof(W), false,
                         ("w (" + label + " [out, in]" + (sizeof(W) == 2 ? ", as 2-byte items)" : ")")).c_str());
        auto oi = matrix(out, 4, true, "out (float32 [tokens, out])");
        if (xi.shape[1] != wi.shape[1] || oi.shape[0] != xi.shape[0] || oi.shape[1] != wi.shape[0])
          throw std::invalid_argument("shapes do not fit: x [" + std::to_string(xi.shape[0]) + ", " +
                                      std::to_string(xi.shape[1]) + "], w [" + std::to_string(wi.shape[0]) + ", " +
                                      std::to_string(wi.shape[1]) + "], out [" + std::to_string(oi.shape[0]) +
                                      ", " + std::to_string(oi.shape[1]) + "]");
        py::gil_scoped_release release;
        KernelBusy busy;
        fn(static_cast<const float*>(xi.ptr), xi.shape[0], static_cast<const W*>(wi.ptr), wi.shape[0], wi.shape[1],
           static_cast<float*>(oi.ptr), threads);
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("threads") = 0,
      ("out = x @ w.T with w in " + label + " read as stored (GIL released; threads=0: all cores).").c_str());
}

}  // namespace

void register_kernels(py::module_& m) {
  def_expert_ffn(m);
  def_attention_step(m);
  def_dense_linear<uint16_t>(m, "linear_bf16", "bf16", &linear_bf16);
  def_dense_linear<float>(m, "linear_f32", "float32", &linear_f32);
  m.def(
      "silu_mul",
      [](const py::buffer& g, const py::buffer& u) {
        auto gi = matrix(g, 4, true, "g (float32 [tokens, n])");
        auto ui = matrix(u, 4, false, "u (float32 [tokens, n])");
        if (gi.shape != ui.shape) throw std::invalid_argument("g and u differ in shape");
        py::gil_scoped_release release;
        KernelBusy busy;
        silu_mul_rows(static_cast<float*>(gi.ptr), static_cast<const float*>(ui.ptr), gi.shape[0], gi.shape[1]);
      },
      py::arg("g"), py::arg("u"),
      "g = silu(g) * u in place, as ExpertFfn computes it between its products (so that a "
      "batched feed-forward can give each row ExpertFfn's bits).");
  def_quant_linear(m, "linear_q8_0", "Q8_0", kQ8Block, kQ8BlockBytes, &linear_q8_0);
  def_quant_linear(m, "linear_q4_0", "Q4_0", kQ4_0Block, kQ4_0BlockBytes, &linear_q4_0);
  def_quant_linear(m, "linear_q4_k", "Q4_K", kQKBlock, kQ4KBlockBytes, &linear_q4_k);
  def_quant_linear(m, "linear_q5_k", "Q5_K", kQKBlock, kQ5KBlockBytes, &linear_q5_k);
  def_quant_linear(m, "linear_q6_k", "Q6_K", kQKBlock, kQ6KBlockBytes, &linear_q6_k);
  def_quant_linear(m, "linear_q4_k_x256", "Q4_K", kQKBlock, kQ4KBlockBytes, &linear_q4_k_x256);
  def_quant_linear(m, "linear_q5_k_x256", "Q5_K", kQKBlock, kQ5KBlockBytes, &linear_q5_k_x256);
  def_quant_linear(m, "linear_q6_k_x256", "Q6_K", kQKBlock, kQ6KBlockBytes, &linear_q6_k_x256);
  def_group_linear(m, "linear_int8", 8, &linear_int8);
  def_group_linear(m, "linear_int4", 4, &linear_int4);
  m.def("linear_path", &linear_path, "The path the kernels take now: 'scalar', 'avx2' or 'avx512'.");
  m.def("linear_paths", &linear_paths, "The paths this CPU can take, narrowest first.");
  m.def("linear_force_path", &linear_force_path, py::arg("name"),
        "For tests and benchmarks: take this path (one of linear_paths()), or the CPU's best for ''.");
  m.def(
      "set_kernel_threads",
      [](int n) {
        if (n < 0) throw std::invalid_argument("threads must be 0 (every CPU allowed) or more, got " + std::to_string(n));
        set_kernel_threads(n);
      },
      py::arg("n"),
      "Threads the kernels use when a call does not say (threads=0): n, at most the CPUs this process may "
      "run on; 0 for all of them (the default). Process-wide.");
  m.def(
      "kernel_busy_seconds", [] { return g_kernel_ns.load(std::memory_order_relaxed) * 1e-9; },
      "Wall seconds callers have spent inside moeedge's compute kernels since the process started "
      "(every kernel call, in any thread, summed).");
  m.def("kernel_threads", &kernel_threads,
        "Threads a kernel call uses when it does not say: set_kernel_threads's n, or the CPUs this process may "
        "run on (its affinity mask).");
}

}  // namespace moeedge
