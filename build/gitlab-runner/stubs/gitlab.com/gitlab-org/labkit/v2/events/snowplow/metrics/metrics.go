// Package metrics is a compile-only stand-in for labkit's Snowplow metrics options.
package metrics

type collectorConfig struct{}

type CollectorOption func(*collectorConfig)

func WithCollectorNamespace(ns string) CollectorOption { return func(*collectorConfig) {} }
func WithCollectorBatchDeliveryDurationBuckets(b []float64) CollectorOption {
	return func(*collectorConfig) {}
}
