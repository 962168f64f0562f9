// Graceful stop of `tandem train` on SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C, or
// `tandem run` tearing a job down): the first signal asks the run to stop after the update in
// progress and save as at the end (trainer::TrainEnv::stop_signal); a second one takes the
// default action at once (the process ends without saving).
//
// Install after MPI_Init: MPI and the libraries it loads may install handlers of their own, and
// the last installed wins. The flag is process-wide (a signal handler can reach nothing else).
#pragma once

#include <atomic>

namespace tandem::launch::internal {

// Installs the handlers; returns the flag they set (0 until a signal; then its number).
const std::atomic<int>* InstallStopSignals();

}  // namespace tandem::launch::internal
