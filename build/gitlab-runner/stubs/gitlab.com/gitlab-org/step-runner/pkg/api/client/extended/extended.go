// Package extended is a compile-only stand-in for step-runner's extended client.
package extended

import (
	"context"
	"errors"
	"io"

	"google.golang.org/grpc"

	"gitlab.com/gitlab-org/step-runner/pkg/api/client"
)

var errNotAvailable = errors.New("step-runner is not available in this build (FireRunner's shell/custom-only gitlab-runner)")

// Dialer opens the gRPC connection.
type Dialer interface {
	Dial() (*grpc.ClientConn, error)
}

// FollowOutput receives a job's logs.
type FollowOutput struct {
	Logs io.Writer
}

// Client would talk to step-runner.
type Client struct{}

// New always fails: there is no step-runner in this build.
func New(d Dialer) (*Client, error) { return nil, errNotAvailable }

func (c *Client) CloseConn() error { return nil }

func (c *Client) Cancel(ctx context.Context, id string) error { return errNotAvailable }

func (c *Client) RunAndFollow(ctx context.Context, req *client.RunRequest, out *FollowOutput) (client.Status, error) {
	return client.Status{}, errNotAvailable
}
