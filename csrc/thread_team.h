// A team of threads kept for a whole time loop. Every step of a layer's time loop (LSTM and GRU,
// forward and backward) splits its work between the threads: the simd GEMMs and the pointwise
// kernels, or the fused step that is both. at::parallel_for starts a parallel region for each
// and ends it: about 1 us each on a Zen 4 with 2 threads, the other thread waking late, and the
// thread that starts first idle at the end. run_with_thread_team instead opens one region for the
// whole loop: the caller's thread runs the loop, the others spin between the kernels and take
// the shares that run_on_threads (and parallel_range) hand out at once.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <c10/util/FunctionRef.h>

namespace lstm_fused {

// Runs loop() on this thread. With `use_team` (and more than one thread, outside any parallel
// region) the other threads of one at::parallel_for region wait, spinning, for the calls of
// run_on_threads that loop makes on this thread; they stop when loop returns or throws. Nothing
// else in loop may need threads: an ATen operation there runs on this thread alone.
void run_with_thread_team(bool use_team, const std::function<void()>& loop);

// body(first, last) for thread slots [0, threads) (threads <= at::get_num_threads()), as
// at::parallel_for(0, threads, 1, body) would run it: each slot once, on the thread team of
// this thread's run_with_thread_team if there is one, else in a parallel region of its own.
// In a team each thread takes its own slot; a slot whose thread has not taken it when the
// caller's thread is done with its own runs there, so no slot waits for a thread that starts
// late (one descheduled in the middle of its slot still holds the job). A body that splits its
// work again runs that on its own thread.
void run_on_threads(int64_t threads, c10::function_ref<void(int64_t, int64_t)> body);

// How many threads run_on_threads and parallel_range split work between: the team's, in one,
// else at::get_num_threads().
int64_t thread_count();

// f(b, e) over [begin, end) as at::parallel_for(begin, end, grain, f) splits it (each thread a
// contiguous range, none smaller than `grain` unless the whole is; inline where the whole range
// is at most `grain`), on this thread's team if there is one: the per-step kernels of a time
// loop split their work with this.
void parallel_range(int64_t begin, int64_t end, int64_t grain,
                    c10::function_ref<void(int64_t, int64_t)> f);

// Test only (_C._thread_team_test): `jobs` calls of run_on_threads(threads, body) in one thread
// team whose threads other than the caller's start serving `late_us` microseconds late; body
// counts the runs of each slot, takes `work_us` microseconds a slot, and in job `throw_at` (if
// >= 0) throws from its last slot.
// Returns each job's runs per slot, job after job, then as many flags: whether the caller's
// thread ran that slot.
std::vector<int64_t> thread_team_test(int64_t threads, int64_t jobs, int64_t late_us,
                                      int64_t work_us, int64_t throw_at);

}  // namespace lstm_fused
