-- Accuracy per IFEval instruction type (strict and loose) of a table of `ifeval` verdicts:
-- which constraints a model follows, or which constraint types pass in generated data.
-- Usage: ifloom sql --run runs/NAME -f sql/ifeval_by_type.sql --param table=ifeval_verdicts \
--          --param instructions=instruction_id_list
SELECT '${table}'                                                  AS "table",
       instruction_type,
       count(*)                                                    AS instructions,
       round(avg(CASE WHEN s THEN 1.0 WHEN NOT s THEN 0.0 END), 4) AS strict_acc,
       round(avg(CASE WHEN l THEN 1.0 WHEN NOT l THEN 0.0 END), 4) AS loose_acc,
       count(*) - count(s)                                         AS unchecked
FROM (SELECT unnest(${instructions}) AS instruction_type, unnest(strict) AS s, unnest(loose) AS l
      FROM ${table})
GROUP BY instruction_type
ORDER BY instruction_type;
