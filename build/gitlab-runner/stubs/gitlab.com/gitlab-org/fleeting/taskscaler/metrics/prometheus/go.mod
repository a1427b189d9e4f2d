// Module gitlab.com/gitlab-org/fleeting/taskscaler/metrics/prometheus is a placeholder: the Go module proxy refuses it, and
// FireRunner's shell/custom-only gitlab-runner imports none of its packages.
module gitlab.com/gitlab-org/fleeting/taskscaler/metrics/prometheus

go 1.24
