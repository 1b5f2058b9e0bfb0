#include "thread_team.h"

#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lstm_fused {
namespace {

std::atomic<int64_t> test_serve_delay_us{0};  // thread_team_test's late start

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Spins until done() holds; after kSpins spins (a few hundred microseconds), yields the core
// between checks, so that a thread that another process descheduled gets it back.
template <typename Done>
void wait_until(const Done& done) {
  constexpr int kSpins = 1 << 14;
  for (int spins = 0; !done(); ++spins) {
    if (spins < kSpins) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

class Team;
thread_local Team* current_team = nullptr;

// The threads of one parallel region, all but the caller's waiting for work. Job g (the g-th
// call of run) opens its slots by setting their state to 2g; taking slot m for job g moves it
// from 2g to 2g + 1, so a slot runs once, and a thread still looking at an earlier job can take
// nothing of a later one. The caller's thread publishes a job (release on generation_), takes
// its own slots, then any still open, and waits until every slot's body has returned (acquire
// on done_): what the bodies wrote is then visible to it and to the next job's threads.
class Team {
 public:
  explicit Team(int64_t size) : slots_(size) {}

  int64_t size() const { return static_cast<int64_t>(slots_.size()); }

  // The calling thread's own slots: [0, end).
  void set_own_slots(int64_t end) { own_end_ = end; }

  void run(int64_t threads, c10::function_ref<void(int64_t, int64_t)> body) {
    // A job within a job (a slot body splitting its work again) runs on its own thread: the
    // team has one job at a time.
    struct Away {
      Team* team = std::exchange(current_team, nullptr);
      ~Away() { current_team = team; }
    } away;
    const uint64_t g = generation_.load(std::memory_order_relaxed) + 1;
    body_.store(&body, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const int64_t shared = std::min<int64_t>(threads, slots_.size());
    for (int64_t m = 0; m < shared; ++m) slots_[m].state.store(2 * g, std::memory_order_relaxed);
    generation_.store(g, std::memory_order_release);
    int64_t ran = 0;
    for (int64_t m = 0; m < std::min(own_end_, shared); ++m) ran += take(m, g);
    for (int64_t m = 0; m < shared; ++m) ran += take(m, g);
    for (int64_t m = shared; m < threads; ++m, ++ran) run_slot(m);  // slots past the team's
    done_.fetch_add(ran, std::memory_order_relaxed);
    wait_until([&] { return done_.load(std::memory_order_acquire) == threads; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

  // A thread of the team other than the caller's: slots [first, last) are its own.
  void serve(int64_t first, int64_t last) {
    if (const int64_t delay = test_serve_delay_us.load(std::memory_order_relaxed)) {
      std::this_thread::sleep_for(std::chrono::microseconds(delay));
    }
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = seen;
      wait_until([&] {
        g = generation_.load(std::memory_order_acquire);
        return g != seen || stopped_.load(std::memory_order_acquire);
      });
      if (g == seen) return;  // stopped
      seen = g;
      for (int64_t m = first; m < std::min<int64_t>(last, slots_.size()); ++m) {
        if (take(m, g)) done_.fetch_add(1, std::memory_order_release);
      }
    }
  }

  void stop() { stopped_.store(true, std::memory_order_release); }

 private:
  // Runs slot m of job g if it is still open; true if it ran here.
  bool take(int64_t m, uint64_t g) {
    uint64_t open = 2 * g;
    if (!slots_[m].state.compare_exchange_strong(open, 2 * g + 1, std::memory_order_acq_rel)) {
      return false;
    }
    run_slot(m);
    return true;
  }

  // The job's body for slot m; an error is kept for the caller, who rethrows it once every slot
  // has returned (the job's objects live until then).
  void run_slot(int64_t m) {
    try {
      (*body_.load(std::memory_order_relaxed))(m, m + 1);
    } catch (...) {
      const std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  struct alignas(64) Slot {
    std::atomic<uint64_t> state{0};
  };
  std::vector<Slot> slots_;
  int64_t own_end_ = 1;
  alignas(64) std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopped_{false};
  std::atomic<const c10::function_ref<void(int64_t, int64_t)>*> body_{nullptr};
  alignas(64) std::atomic<int64_t> done_{0};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

}  // namespace

void run_with_thread_team(bool use_team, const std::function<void()>& loop) {
  const int64_t threads = at::get_num_threads();
  // With ATen's own thread pool (not OpenMP) a team's threads would hold the pool's threads
  // for the whole loop: other callers' regions would wait for them.
  if (!AT_PARALLEL_OPENMP || !use_team || threads <= 1 || at::in_parallel_region() ||
      current_team) {
    loop();
    return;
  }
  Team team(threads);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    if (first != 0) {
      team.serve(first, last);
      return;
    }
    // The thread given slot 0 (and whatever else the region gave it) runs the loop.
    struct Leave {
      Team& team;
      ~Leave() {
        current_team = nullptr;
        team.stop();
      }
    } leave{team};
    team.set_own_slots(last);
    current_team = &team;
    loop();
  });
}

int64_t thread_count() { return current_team ? current_team->size() : at::get_num_threads(); }

void run_on_threads(int64_t threads, c10::function_ref<void(int64_t, int64_t)> body) {
  if (current_team) {
    current_team->run(threads, body);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) { body(first, last); });
}

void parallel_range(int64_t begin, int64_t end, int64_t grain,
                    c10::function_ref<void(int64_t, int64_t)> f) {
  if (!current_team) {
    at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { f(b, e); });
    return;
  }
  // at::parallel_for's split (ATen/ParallelOpenMP.h): ceil(n / grain) threads at most, equal
  // contiguous chunks.
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t task = std::max<int64_t>(grain, 1);
  const int64_t threads = std::min(current_team->size(), (n + task - 1) / task);
  if (threads <= 1) {  // also every range of at most `grain`
    f(begin, end);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  run_on_threads((n + chunk - 1) / chunk, [&](int64_t first, int64_t last) {
    f(begin + first * chunk, std::min(end, begin + last * chunk));
  });
}

std::vector<int64_t> thread_team_test(int64_t threads, int64_t jobs, int64_t late_us,
                                      int64_t work_us, int64_t throw_at) {
  TORCH_CHECK(threads >= 1 && jobs >= 0, "thread_team_test: threads >= 1 and jobs >= 0");
  std::vector<std::atomic<int64_t>> runs(threads * jobs), on_caller(threads * jobs);
  const std::thread::id caller = std::this_thread::get_id();
  test_serve_delay_us.store(late_us);
  struct Reset {
    ~Reset() { test_serve_delay_us.store(0); }
  } reset;
  run_with_thread_team(true, [&] {
    for (int64_t job = 0; job < jobs; ++job) {
      run_on_threads(threads, [&](int64_t first, int64_t last) {
        for (int64_t slot = first; slot < last; ++slot) {
          runs[job * threads + slot].fetch_add(1);
          const auto start = std::chrono::steady_clock::now();
          while (std::chrono::steady_clock::now() - start < std::chrono::microseconds(work_us)) {
          }
          if (std::this_thread::get_id() == caller) on_caller[job * threads + slot].store(1);
          TORCH_CHECK(!(job == throw_at && slot == threads - 1), "thread_team_test: job ", job,
                      " threw");
        }
      });
    }
  });
  std::vector<int64_t> result(runs.begin(), runs.end());
  result.insert(result.end(), on_caller.begin(), on_caller.end());
  return result;
}

}  // namespace lstm_fused
