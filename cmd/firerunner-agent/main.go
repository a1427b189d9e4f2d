// Command firerunner-agent is the FireRunner guest agent, PID 1 in every
// microVM (static, CGO_ENABLED=0); the logic lives in internal/agent.
package main

import "github.com/firerunner/firerunner/internal/agent"

func main() { agent.Main() }
