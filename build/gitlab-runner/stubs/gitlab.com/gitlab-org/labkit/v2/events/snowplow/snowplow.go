// Package snowplow is a compile-only stand-in for labkit's Snowplow events:
// billing usage events are not available in this build.
package snowplow

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"gitlab.com/gitlab-org/labkit/v2/events/snowplow/metrics"
	"gitlab.com/gitlab-org/labkit/v2/events/snowplow/oidc"
)

var errNotAvailable = errors.New("snowplow events are not available in this build (FireRunner's shell/custom-only gitlab-runner)")

// SendResult reports one batch delivery.
type SendResult struct {
	EventCount int
	StatusCode int
	Err        error
}

type SendCallback func(successes []SendResult, failures []SendResult)

type emitterConfig struct{}

type EmitterOption func(*emitterConfig)

func WithCallback(cb SendCallback) EmitterOption        { return func(*emitterConfig) {} }
func WithTokenSource(ts oidc.TokenSource) EmitterOption { return func(*emitterConfig) {} }
func WithMetricsCollectorOptions(o ...metrics.CollectorOption) EmitterOption {
	return func(*emitterConfig) {}
}

// Emitter would deliver events.
type Emitter struct{}

// NewEmitter always fails: Snowplow is not available in this build.
func NewEmitter(collectorURI string, opts ...EmitterOption) (*Emitter, error) {
	return nil, errNotAvailable
}

func (e *Emitter) Collector() prometheus.Collector { return nil }

// Tracker would track events.
type Tracker struct{}

func NewTracker(appID string, e *Emitter) (*Tracker, error) { return nil, errNotAvailable }

func (t *Tracker) Stop() {}

func (t *Tracker) TrackBillingEventWithOptionalInput(r BillingEventRequiredInput, o BillingEventOptionalInput) error {
	return errNotAvailable
}

type BillingEventRequiredInput struct {
	Category      string
	EventType     string
	Realm         string
	UnitOfMeasure string
	Quantity      float64
}

type BillingEventOptionalInput struct {
	Subject          string
	DeploymentType   string
	Metadata         map[string]any
	InstanceID       string
	UniqueInstanceID string
	ProjectID        int64
	NamespaceID      int64
	RootNamespaceID  int64
	OrganizationID   int64
}
