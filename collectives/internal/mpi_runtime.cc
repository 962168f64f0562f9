// MpiRuntime and CreateMpiWorld (collectives/mpi.h).
#include <mpi.h>

#include <cstdlib>

#include "collectives/internal/common.h"
#include "collectives/internal/mpi_check.h"
#include "collectives/internal/mpi_communicator.h"
#include "collectives/mpi.h"
#include "core/logging.h"

namespace tandem::collectives {

StatusOr<MpiRuntime> MpiRuntime::Init(int* argc, char*** argv, const CollectiveOptions& options) {
  TANDEM_RETURN_IF_ERROR(internal::ValidateOptions(options));
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) {
    return FailedPreconditionError("MpiRuntime::Init: MPI is already initialized in this process");
  }
  int provided = 0;
  TANDEM_MPI_RETURN_IF_ERROR(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MpiRuntime rt;
  rt.active_ = true;
  rt.timeout_s_ = options.timeout_s;
  rt.thread_multiple_ = provided >= MPI_THREAD_MULTIPLE;
  MPI_Comm_rank(MPI_COMM_WORLD, &rt.world_rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &rt.world_size_);
  // Ranks sharing this node's memory give the local rank (the GPU index).
  MPI_Comm node = MPI_COMM_NULL;
  TANDEM_MPI_RETURN_IF_ERROR(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node));
  MPI_Comm_rank(node, &rt.local_rank_);
  MPI_Comm_size(node, &rt.local_size_);
  MPI_Comm_free(&node);
  char host[MPI_MAX_PROCESSOR_NAME];
  int len = 0;
  MPI_Get_processor_name(host, &len);
  rt.host_name_.assign(host, len);
  // Made now, while every rank is here, so that Finalize can name a rank that never comes.
  TANDEM_ASSIGN_OR_RETURN(
      MPI_Comm comm,
      internal::DupComm(MPI_COMM_WORLD, internal::Deadline(options.timeout_s), "MpiRuntime::Init"));
  TANDEM_ASSIGN_OR_RETURN(rt.finalize_group_,
                          internal::MpiCommunicator::Create(comm, "finalize", options));
  return rt;
}

MpiRuntime::MpiRuntime(MpiRuntime&& other) noexcept { *this = std::move(other); }

MpiRuntime& MpiRuntime::operator=(MpiRuntime&& other) noexcept {
  active_ = other.active_;
  timeout_s_ = other.timeout_s_;
  world_rank_ = other.world_rank_;
  world_size_ = other.world_size_;
  local_rank_ = other.local_rank_;
  local_size_ = other.local_size_;
  thread_multiple_ = other.thread_multiple_;
  host_name_ = std::move(other.host_name_);
  finalize_group_ = std::move(other.finalize_group_);
  other.active_ = false;
  return *this;
}

MpiRuntime::~MpiRuntime() {
  TANDEM_LOG_IF(WARNING, "collectives", active_)
      << "MpiRuntime destroyed without Finalize(): MPI is left initialized (mpirun will report "
         "this rank as failed)";
}

Status MpiRuntime::Finalize() {
  if (!active_) return Status::Ok();
  // A timed barrier with arrival tracking, so a missing rank is named.
  TANDEM_RETURN_IF_ERROR(finalize_group_->Barrier());
  TANDEM_RETURN_IF_ERROR(finalize_group_->Close());
  finalize_group_.reset();
  TANDEM_MPI_RETURN_IF_ERROR(MPI_Finalize());
  active_ = false;
  return Status::Ok();
}

void MpiRuntime::AbortJob(int exit_code, const std::string& reason) {
  TANDEM_LOG(ERROR, "collectives")
      << "aborting the job (exit code " << exit_code << "): " << reason;
  if (internal::MpiActive()) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);
}

StatusOr<std::unique_ptr<Communicator>> CreateMpiWorld(const CollectiveOptions& options) {
  TANDEM_RETURN_IF_ERROR(internal::ValidateOptions(options));
  if (!internal::MpiActive()) {
    return FailedPreconditionError(
        "CreateMpiWorld: MPI is not initialized (call MpiRuntime::Init)");
  }
  TANDEM_ASSIGN_OR_RETURN(MPI_Comm comm,
                          internal::DupComm(MPI_COMM_WORLD, internal::Deadline(options.timeout_s),
                                            "creating group 'world'"));
  TANDEM_ASSIGN_OR_RETURN(auto world, internal::MpiCommunicator::Create(comm, "world", options));
  return std::unique_ptr<Communicator>(std::move(world));
}

}  // namespace tandem::collectives
