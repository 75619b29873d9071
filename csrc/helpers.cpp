// Index builders for the GPT and blended datasets, importable as `engine.data.helpers`.
//
// Each loop is O(output) and runs without the GIL, so other Python threads (a data loader, a
// logger) keep running while one rank builds a cache. The pure-NumPy equivalents in
// engine/data/helpers_reference.py define the semantics; tests check both agree.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using SizesArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kPrefetch = 16;

// Walk the concatenated token stream (documents in `document_index` order) and record where
// every sample starts: sample i starts at stream position i * seq_length and needs
// `extra_token` more tokens after its last one (the shifted label). Row i is (position in
// document_index, token offset in that document). Where a boundary falls exactly on a document
// end, the earlier document is kept with its offset one past the sample's last input token,
// as Megatron-Core does, so cached indices are interchangeable.
template <typename DocIndex, typename Out>
py::array_t<Out> sample_idx_impl(const int32_t *sizes, int64_t num_sizes,
                                 const DocIndex *document_index, int64_t num_entries,
                                 int64_t seq_length, int64_t total_tokens,
                                 bool drop_last_partial_sequence, int64_t extra_token) {
  const int64_t usable = total_tokens - extra_token;
  const int64_t num_samples = drop_last_partial_sequence ? usable / seq_length
                                                         : ceil_div(usable, seq_length);
  py::array_t<Out> result({num_samples + 1, int64_t{2}});
  Out *out = result.mutable_data();
  bool bad_document = false;
  {
    py::gil_scoped_release release;
    out[0] = 0;
    out[1] = 0;
    int64_t entry = 0;
    int64_t doc_start = 0;
    auto size_of = [&](int64_t e) -> int64_t {
      const int64_t doc = static_cast<int64_t>(document_index[e]);
      if (doc < 0 || doc >= num_sizes) {
        bad_document = true;
        return 0;
      }
      return sizes[doc];
    };
    int64_t doc_end = size_of(0);
    for (int64_t i = 1; i <= num_samples && !bad_document; ++i) {
      const int64_t start = i * seq_length;
      const int64_t needed = start + extra_token;  // tokens the previous sample consumes
      while (doc_end < needed && entry + 1 < num_entries) {
        ++entry;
        // The walk gathers sizes in shuffled order: fetch a few entries ahead.
        if (entry + kPrefetch < num_entries) {
          const int64_t ahead = static_cast<int64_t>(document_index[entry + kPrefetch]);
          if (ahead >= 0 && ahead < num_sizes) __builtin_prefetch(sizes + ahead);
        }
        doc_start = doc_end;
        doc_end += size_of(entry);
      }
      if (doc_end < needed) {  // only the last, partial sample runs off the end
        out[2 * i] = static_cast<Out>(num_entries - 1);
        // Clamped at 0 for an empty last document (Megatron-Core would write -1 and assert).
        out[2 * i + 1] = static_cast<Out>(std::max<int64_t>(size_of(num_entries - 1) - extra_token, 0));
      } else {
        out[2 * i] = static_cast<Out>(entry);
        out[2 * i + 1] = static_cast<Out>(start - doc_start);
      }
    }
  }
  if (bad_document) {
    throw std::out_of_range("document_index holds a document id outside sizes (" +
                            std::to_string(num_sizes) + " documents)");
  }
  return result;
}

template <typename DocIndex>
py::array dispatch_output(const SizesArray &sizes, const py::array_t<DocIndex> &document_index,
                          int64_t seq_length, int64_t total_tokens, bool drop_last,
                          int64_t extra_token) {
  // Offsets are below a document's int32 size, so int32 rows fit whenever the document
  // index does; they halve the cache, as Megatron-Core's do.
  const bool fits = document_index.size() <= std::numeric_limits<int32_t>::max();
  if (fits) {
    return sample_idx_impl<DocIndex, int32_t>(sizes.data(), sizes.size(), document_index.data(),
                                              document_index.size(), seq_length, total_tokens,
                                              drop_last, extra_token);
  }
  return sample_idx_impl<DocIndex, int64_t>(sizes.data(), sizes.size(), document_index.data(),
                                            document_index.size(), seq_length, total_tokens,
                                            drop_last, extra_token);
}

py::array build_sample_idx(const SizesArray &sizes, const py::array &document_index,
                           int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch,
                           bool drop_last_partial_sequence, bool add_extra_token_to_sequence) {
  if (seq_length < 1) throw std::invalid_argument("seq_length must be at least 1");
  if (num_epochs < 1) throw std::invalid_argument("num_epochs must be at least 1");
  if (document_index.ndim() != 1 || document_index.size() == 0) {
    throw std::invalid_argument("document_index must be a non-empty 1-D array");
  }
  const int64_t extra = add_extra_token_to_sequence ? 1 : 0;
  const int64_t total = num_epochs * tokens_per_epoch;
  if (total <= extra) throw std::invalid_argument("not enough tokens for a single sample");
  if (py::isinstance<py::array_t<int32_t>>(document_index)) {
    return dispatch_output<int32_t>(sizes, document_index.cast<py::array_t<int32_t>>(), seq_length,
                                    total, drop_last_partial_sequence, extra);
  }
  auto as_int64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>(document_index);
  return dispatch_output<int64_t>(sizes, as_int64, seq_length, total, drop_last_partial_sequence,
                                  extra);
}

// The greedy rule both blends share: sample i goes to the dataset whose achieved count lags
// its target weight * max(i, 1) the most (lowest index on ties); with `caps`, a dataset that
// has reached its cap is passed over. Runs without the GIL.
void greedy_blend(const std::vector<double> &weights, const std::vector<int64_t> *caps,
                  int64_t size, int16_t *which, int64_t *nth) {
  py::gil_scoped_release release;
  const int64_t n = static_cast<int64_t>(weights.size());
  std::vector<int64_t> counts(n, 0);
  for (int64_t i = 0; i < size; ++i) {
    const double target = static_cast<double>(std::max<int64_t>(i, 1));
    int64_t best = -1;
    double best_lag = std::numeric_limits<double>::lowest();
    for (int64_t d = 0; d < n; ++d) {
      if (caps != nullptr && counts[d] == (*caps)[d]) continue;
      const double lag = weights[d] * target - static_cast<double>(counts[d]);
      if (best < 0 || lag > best_lag) {
        best_lag = lag;
        best = d;
      }
    }
    which[i] = static_cast<int16_t>(best);
    nth[i] = counts[best]++;
  }
}

void check_dataset_count(int64_t n) {
  if (n < 1 || n > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("need between 1 and 32767 datasets, got " + std::to_string(n));
  }
}

// Greedy blending by weight: `size` samples.
py::tuple build_blending_indices(
    const py::array_t<double, py::array::c_style | py::array::forcecast> &weights, int64_t size) {
  check_dataset_count(weights.size());
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  const std::vector<double> w(weights.data(), weights.data() + weights.size());
  greedy_blend(w, nullptr, size, dataset_index.mutable_data(),
               dataset_sample_index.mutable_data());
  return py::make_tuple(dataset_index, dataset_sample_index);
}

// Exhaustive blending: exactly sizes[d] samples of each dataset d, interleaved by the same
// rule with weights sizes / sum(sizes); a dataset drops out once it is used up.
py::tuple build_exhaustive_blending_indices(
    const py::array_t<int64_t, py::array::c_style | py::array::forcecast> &sizes) {
  check_dataset_count(sizes.size());
  const std::vector<int64_t> caps(sizes.data(), sizes.data() + sizes.size());
  int64_t total = 0;
  for (int64_t s : caps) {
    if (s < 0) throw std::invalid_argument("dataset sizes must not be negative");
    total += s;
  }
  std::vector<double> w(caps.size());
  for (size_t d = 0; d < caps.size(); ++d) {
    w[d] = static_cast<double>(caps[d]) / static_cast<double>(total);
  }
  py::array_t<int16_t> dataset_index(total);
  py::array_t<int64_t> dataset_sample_index(total);
  greedy_blend(w, &caps, total, dataset_index.mutable_data(),
               dataset_sample_index.mutable_data());
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(helpers, m) {
  m.doc() = "Sample and blending index builders (C++; NumPy reference in helpers_reference.py)";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = true,
        "[num_samples + 1, 2] rows of (position in document_index, offset) where each sample "
        "starts; int32 when every value fits, else int64.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "(dataset_index int16[size], dataset_sample_index int64[size]), greedy by weight.");
  m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices,
        py::arg("sizes"),
        "(dataset_index, dataset_sample_index) using exactly sizes[d] samples of dataset d.");
}
