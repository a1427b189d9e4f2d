// Module gitlab.com/gitlab-org/fleeting/fleeting is a placeholder: the Go module proxy refuses it, and
// FireRunner's shell/custom-only gitlab-runner imports none of its packages.
module gitlab.com/gitlab-org/fleeting/fleeting

go 1.24
