#include "buffer_cache.h"

#include <c10/core/CPUAllocator.h>

#include "../new_outputs.h"

#include <cstdlib>
#include <mutex>
#include <vector>

namespace seqkern::cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;  // smaller ones come from malloc's heap
constexpr size_t kMaxCachedBytes = size_t(1) << 30;
constexpr size_t kMaxBlocks = 16;  // a training step frees about 10
constexpr size_t kAlignment = 64;

struct Block {
  void* data;
  size_t bytes;
};

class BufferCache {
 public:
  // A block of at least `bytes` (its capacity in *capacity): a cached one no more than
  // twice as large, or a new one.
  void* take(size_t bytes, size_t* capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].bytes >= bytes && free_[i].bytes <= 2 * bytes &&
            (best == free_.size() || free_[i].bytes < free_[best].bytes))
          best = i;
      if (best != free_.size()) {
        const Block b = free_[best];
        free_.erase(free_.begin() + best);
        held_ -= b.bytes;
        *capacity = b.bytes;
        return b.data;
      }
    }
    *capacity = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    void* data = std::aligned_alloc(kAlignment, *capacity);
    TORCH_CHECK(data != nullptr, "seqkern: out of memory allocating ", *capacity, " bytes");
    return data;
  }

  // Keeps the block for reuse, evicting the oldest ones beyond the limits.
  void give(void* data, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back({data, bytes});
      held_ += bytes;
      while (!free_.empty() && (held_ > kMaxCachedBytes || free_.size() > kMaxBlocks)) {
        evicted.push_back(free_.front().data);
        held_ -= free_.front().bytes;
        free_.erase(free_.begin());
      }
    }
    for (void* p : evicted) std::free(p);
  }

 private:
  std::mutex mutex_;
  std::vector<Block> free_;
  size_t held_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static
// destructors would have run.
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

}  // namespace

namespace {
// A block lent to a tensor's storage, handed back to the cache when the storage lets it go.
struct LentBlock {
  void* data;
  size_t capacity;
};

void give_back(void* ctx) {
  const LentBlock* block = static_cast<const LentBlock*>(ctx);
  cache().give(block->data, block->capacity);
  delete block;
}
}  // namespace

at::Tensor cached_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  const size_t bytes = size_t(numel) * options.dtype().itemsize();
  // Under SEQKERN_POISON_OUTPUTS=1 (the tests) a floating buffer starts as NaN, as new_output's
  // do: a reused block would otherwise hide elements a kernel never writes behind the values
  // of an earlier call.
  const bool poison = poison_outputs() && at::isFloatingType(options.dtype().toScalarType());
  if (bytes < kMinCachedBytes || !options.device().is_cpu())
    return poison ? new_output(shape, options) : at::empty(shape, options);
  size_t capacity = 0;
  void* data = cache().take(bytes, &capacity);
  // A resizable storage, as at::empty's: growing it (out.resize_ on a layer's output)
  // allocates from the CPU allocator, copies, and gives the block back.
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes,
                       c10::DataPtr(data, new LentBlock{data, capacity}, &give_back,
                                    at::Device(at::kCPU)),
                       c10::GetCPUAllocator(), /*resizable=*/true);
  at::Tensor t = at::empty({0}, options).set_(storage, 0, shape);
  return poison ? t.fill_(NAN) : t;
}

}  // namespace seqkern::cpu
