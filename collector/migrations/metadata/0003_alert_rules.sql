-- Alert rules evaluated by the collectors (docs/alerts.md): hysteresis, keep-firing-for and
-- no-data rules; every change is announced to the collectors, which reload their rules.

-- NULL: the threshold itself. A '>'/'>=' rule clears below it, a '<'/'<=' rule above it.
ALTER TABLE alert_rules ADD COLUMN clear_threshold double precision;
ALTER TABLE alert_rules ADD COLUMN keep_firing_for interval NOT NULL DEFAULT '0 seconds';
-- Set: a no-data rule, firing when the metric is silent this long (condition and threshold
-- are then not used).
ALTER TABLE alert_rules ADD COLUMN no_data_for interval;
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_clear_side CHECK (
    clear_threshold IS NULL OR clear_threshold = threshold
    OR (condition IN ('>', '>=') AND clear_threshold < threshold)
    OR (condition IN ('<', '<=') AND clear_threshold > threshold)
);
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_no_data_positive CHECK (
    no_data_for IS NULL OR no_data_for > '0 seconds'
);

CREATE TRIGGER alert_rules_notify AFTER INSERT OR UPDATE OR DELETE ON alert_rules
    FOR EACH ROW EXECUTE FUNCTION sensormine_registry_notify('id');
