// Package server is a compile-only stand-in for the runner_wrapper gRPC server.
package server

import (
	"net"

	"github.com/sirupsen/logrus"
)

// Server would serve the wrapper's gRPC API.
type Server struct{ log logrus.FieldLogger }

func New(log logrus.FieldLogger, w any) *Server { return &Server{log: log} }

// Listen closes l: the gRPC control API is not available in this build.
func (s *Server) Listen(l net.Listener) error {
	s.log.Warn("runner wrapper gRPC API is not available in this build")
	return l.Close()
}

func (s *Server) Stop() {}
