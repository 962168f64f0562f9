// The SIGTERM/SIGINT handlers of `tandem train` (see stop_signals.h).
#include "launch/internal/stop_signals.h"

#include <signal.h>
#include <unistd.h>

namespace tandem::launch::internal {
namespace {

// Process-wide by necessity: the handler can reach nothing else.
std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the handler needs a lock-free flag");

void Write(const char* text) {
  size_t n = 0;
  while (text[n] != '\0') ++n;
  (void)!write(STDERR_FILENO, text, n);  // async-signal-safe; nothing to do if it fails
}

void OnStopSignal(int signal_number) {
  int expected = 0;
  if (g_stop_signal.compare_exchange_strong(expected, signal_number)) {
    Write(signal_number == SIGINT
              ? "\ntandem train: SIGINT: stopping after the update in progress and saving "
                "(send it again to stop at once, without saving)\n"
              : "\ntandem train: SIGTERM: stopping after the update in progress and saving "
                "(send it again to stop at once, without saving)\n");
    return;
  }
  // The second signal: the default action (the process ends now).
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(signal_number, &dfl, nullptr);
  raise(signal_number);
}

}  // namespace

const std::atomic<int>* InstallStopSignals() {
  struct sigaction action {};
  action.sa_handler = &OnStopSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // a blocking read or write in progress goes on
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  return &g_stop_signal;
}

}  // namespace tandem::launch::internal
